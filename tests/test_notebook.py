"""The learning-curve notebook runs top to bottom on a folder of runs and plots one curve per run."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

from saal_lightning.reporting.round_log import write_rounds_csv

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "learning_curves.ipynb"


def test_notebook_plots_every_run(tmp_path, monkeypatch, capsys) -> None:
    for strategy, accuracies in {"saal": [0.5, 0.7, 0.8], "random": [0.5, 0.6, 0.65]}.items():
        rows = [{"round": i, "num_labeled": 20 + 10 * i, "test_acc": a, "best_test_acc": max(accuracies[: i + 1]),
                 "strategy": strategy} for i, a in enumerate(accuracies)]
        write_rounds_csv(tmp_path / "runs" / strategy / "version_0" / "rounds.csv", rows)
    (tmp_path / "notebooks").mkdir()
    monkeypatch.chdir(tmp_path / "notebooks")
    displayed = []
    display_module = types.ModuleType("IPython.display")
    display_module.Image = lambda path: path
    display_module.display = displayed.append
    ipython = types.ModuleType("IPython")
    ipython.get_ipython = lambda: None  # matplotlib asks whether (and which) IPython it runs inside
    ipython.version_info = (8, 0, 0)
    monkeypatch.setitem(sys.modules, "IPython", ipython)
    monkeypatch.setitem(sys.modules, "IPython.display", display_module)

    namespace: dict = {}
    for cell in json.loads(NOTEBOOK.read_text())["cells"]:
        if cell["cell_type"] == "code":
            exec("".join(cell["source"]), namespace)
    printed = capsys.readouterr().out
    assert "2 runs found" in printed
    assert "best test acc=80.00%" in printed and "best test acc=65.00%" in printed
    assert set(namespace["curves"]) == {"random (random/version_0)", "saal (saal/version_0)"}
    assert displayed == [str(Path("learning_curves.png"))]
    assert (tmp_path / "notebooks" / "learning_curves.png").stat().st_size > 1000
