"""The notebooks run top to bottom, in a Jupyter kernel of this interpreter, on the files that runs write."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import lightning.pytorch as pl
import nbformat
import pytest
import torch
from nbclient import NotebookClient

from saal_lightning import AcquisitionCallback
from saal_lightning.acquisition.strategies.saal import SAAL
from saal_lightning.callbacks.sharpness_diagnostics import SharpnessDiagnostics
from saal_lightning.reporting.round_log import write_rounds_csv
from tests.callbacks.tiny_experiment import QUIET, tiny_classifier, tiny_datamodule

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
KERNEL = "saal-lightning-tests"


@pytest.fixture()
def jupyter(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel spec for this very interpreter (the virtual environment's), in a private Jupyter path.

    Jupyter's runtime files and IPython's profile go to the same private folder, so the tests write nothing into
    the home directory; the kernel runs one intra-op thread (the machine may be busy).
    """
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "data" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "saal-lightning tests",
        "language": "python",
        "env": {"OMP_NUM_THREADS": "1"},
    }))
    monkeypatch.setenv("JUPYTER_PATH", str(root / "data"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(root / "runtime"))
    monkeypatch.setenv("JUPYTER_CONFIG_DIR", str(root / "config"))
    monkeypatch.setenv("IPYTHONDIR", str(root / "ipython"))


@pytest.fixture()
def one_thread():
    # Tiny models gain nothing from a second intra-op thread, and on a busy 2-core machine it slows them manyfold.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _execute(notebook: Path, cwd: Path) -> tuple[str, list[dict]]:
    """Run every cell in ``cwd`` (a failing cell raises); the printed text and the displayed PNG images."""
    nb = nbformat.read(notebook, as_version=4)
    NotebookClient(nb, kernel_name=KERNEL, timeout=180, resources={"metadata": {"path": str(cwd)}}).execute()
    outputs = [output for cell in nb.cells if cell.cell_type == "code" for output in cell.outputs]
    printed = "".join(output.get("text", "") for output in outputs if output.output_type == "stream")
    images = [output for output in outputs if "image/png" in output.get("data", {})]
    return printed, images


def test_the_learning_curves_notebook_plots_every_run(tmp_path: Path, jupyter: None) -> None:
    for strategy, accuracies in {"saal": [0.5, 0.7, 0.8], "random": [0.5, 0.6, 0.65]}.items():
        rows = [{"round": i, "num_labeled": 20 + 10 * i, "test_acc": a, "best_test_acc": max(accuracies[: i + 1]),
                 "strategy": strategy} for i, a in enumerate(accuracies)]
        write_rounds_csv(tmp_path / "runs" / strategy / "version_0" / "rounds.csv", rows)
    (tmp_path / "notebooks").mkdir()
    printed, images = _execute(NOTEBOOKS / "learning_curves.ipynb", tmp_path / "notebooks")
    assert "2 runs found" in printed
    assert "best test acc=80.00%" in printed and "best test acc=65.00%" in printed
    assert "random (random/version_0)" in printed and "saal (saal/version_0)" in printed
    assert len(images) == 1
    assert (tmp_path / "notebooks" / "learning_curves.png").stat().st_size > 1000


def _tiny_run(folder: Path, strategy, seed: int) -> None:
    """Two acquisition rounds inside one fit, with the diagnostics, writing into ``folder``."""
    acquisition = AcquisitionCallback(strategy, query_size=4, pool_size=30, num_rounds=2, epochs_per_round=1,
                                      output_dir=str(folder), plot=False, seed=seed)
    diagnostics = SharpnessDiagnostics(sample_size=40, hessian_iterations=5, seed=seed)
    pl.Trainer(callbacks=[acquisition, diagnostics], reload_dataloaders_every_n_epochs=1, enable_checkpointing=False,
               **QUIET).fit(tiny_classifier(), datamodule=tiny_datamodule(seed=seed))


def test_the_sharpness_notebook_draws_figures_1_3_4_and_the_learning_curves(tmp_path: Path, jupyter: None,
                                                                           one_thread: None) -> None:
    runs = tmp_path / "runs"
    for seed in (1, 2):
        _tiny_run(runs / "saal_adam" / f"seed{seed}", SAAL(rho=0.05, adaptive=True), seed)
    _tiny_run(runs / "random_adam" / "seed1", "random", 1)
    # A run without diagnostics (only rounds.csv) joins the learning curves and stays out of the other figures.
    write_rounds_csv(runs / "entropy_adam" / "seed1" / "rounds.csv",
                     [{"round": i, "num_labeled": 8 + 4 * i, "test_acc": 0.5, "best_test_acc": 0.5,
                       "strategy": "entropy"} for i in range(3)])
    (tmp_path / "notebooks").mkdir()
    printed, images = _execute(NOTEBOOKS / "sharpness_figures.ipynb", tmp_path / "notebooks")

    assert "4 runs in 3 groups under ../runs; 3 with diagnostics" in printed
    assert "saal (saal_adam), ρ=0.05 adaptive: 2 run(s), 3 rounds, 6 diagnostics rows" in printed
    figures = tmp_path / "notebooks" / "figures"
    names = ("learning_curves.png", "figure3_perturbed_loss.png", "figure4_prediction_kept.png",
             "figure1_bound_terms.png")
    for name in names:
        assert (figures / name).stat().st_size > 5000, name
    assert len(images) == len(names)
    # What each panel drew: two groups with diagnostics, three rounds each, so six points per line panel.
    panels = {name: dict(re.findall(r"(\([a-c]\)[^=;]*) = (\d+) points", line))
              for name in names[1:] for line in printed.splitlines() if line.startswith(f"figures/{name}:")}
    for name in ("figure3_perturbed_loss.png", "figure4_prediction_kept.png"):
        assert list(panels[name].values()) == ["6", "6", "6"], panels[name]
    assert len(panels["figure1_bound_terms.png"]) == 3
    assert all(int(points) > 0 for points in panels["figure1_bound_terms.png"].values())
    curves_line = next(line for line in printed.splitlines() if line.startswith("figures/learning_curves.png:"))
    assert "saal (saal_adam), ρ=0.05 adaptive: 3 points" in curves_line
    assert "entropy (entropy_adam): 3 points" in curves_line
    assert "entropy (entropy_adam): 50.00 ± 0.00 % test accuracy at 16 labels (1 runs)" in printed
