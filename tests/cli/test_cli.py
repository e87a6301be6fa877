"""The real `saal` CLI (LightningCLI) driven through `main(args)` on the quickstart config, made tiny."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from saal_lightning.cli import main
from saal_lightning.data import vision_datasets
from tests.synthetic_data import write_fashion

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")


@pytest.fixture
def tiny_fashion_mnist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A 60/20-image Fashion-MNIST in IDX .gz form where the Debian package would be; returns the data root."""
    debian = tmp_path / "debian-fashion-mnist"
    write_fashion(debian, compressed=True, train_count=60, test_count=20)
    monkeypatch.setattr(vision_datasets, "DEBIAN_FASHION_MNIST_DIR", debian)
    return tmp_path / "data"


def _tiny_overrides(tmp_path: Path, data_root: Path) -> list[str]:
    return [
        "--data.init_args.root", str(data_root),
        "--data.init_args.batch_size", "8",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
        "--acquisition.num_rounds", "2",
        "--acquisition.epochs_per_round", "1",
        "--acquisition.query_size", "5",
        "--acquisition.pool_size", "15",
    ]


def test_quickstart_config_runs_end_to_end(tmp_path: Path, tiny_fashion_mnist: Path) -> None:
    main(["fit", "--config", QUICKSTART, *_tiny_overrides(tmp_path, tiny_fashion_mnist)])
    run_dir = next((tmp_path / "runs" / "quickstart").glob("version_*"))
    with open(run_dir / "rounds.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["num_labeled"]) for r in rows] == [20, 25, 30]
    assert {r["strategy"] for r in rows} == {"saal"}
    assert (run_dir / "config.yaml").exists() and (run_dir / "learning_curve.png").exists()
    assert (run_dir / "checkpoints" / "last.ckpt").exists()
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]  # 3 rounds x 1 epoch, then the fit stopped


def test_one_override_switches_the_strategy(tmp_path: Path, tiny_fashion_mnist: Path) -> None:
    main(["fit", "--config", QUICKSTART, *_tiny_overrides(tmp_path, tiny_fashion_mnist),
          "--acquisition.strategy", "entropy", "--acquisition.num_rounds", "1"])
    rows = (next((tmp_path / "runs" / "quickstart").glob("version_*")) / "rounds.csv").read_text()
    assert rows.count(",entropy,") == 2


def test_print_config_documents_the_acquisition_section(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", QUICKSTART, "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "acquisition:" in printed
    assert "class_path: saal_lightning.acquisition.strategies.SAAL" in printed
    assert "reload_dataloaders_every_n_epochs: 1" in printed


def test_help_lists_every_option_with_its_docstring(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    text = capsys.readouterr().out
    for option, words in [
        ("--acquisition.query_size", "items labeled per round"),
        ("--acquisition.reset_weights", "initial weights"),
        ("--model.optimizer", "SAM"),
    ]:
        assert option in text
        assert words in text


def test_missing_data_set_is_a_clear_error_not_a_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr(vision_datasets, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "nowhere")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", QUICKSTART, *_tiny_overrides(tmp_path, tmp_path / "empty")])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "Fashion-MNIST was not found" in error and "apt-get install dataset-fashion-mnist" in error
    assert "Traceback" not in error


def test_module_entry_point_answers_help() -> None:
    result = subprocess.run([sys.executable, "-m", "saal_lightning", "--help"], capture_output=True, text=True,
                            timeout=120, cwd=REPO)
    assert result.returncode == 0
    assert "fit" in result.stdout


def test_any_backbone_by_class_path(tmp_path: Path, tiny_fashion_mnist: Path) -> None:
    backbone = '{"class_path": "tests.synthetic_data.TinyMLP", "init_args": {"in_features": 784, "num_classes": 10}}'
    main(["fit", "--config", QUICKSTART, *_tiny_overrides(tmp_path, tiny_fashion_mnist), "--model.backbone", backbone,
          "--acquisition.strategy", "entropy"])
    run_dir = next((tmp_path / "runs" / "quickstart").glob("version_*"))
    assert "class_path: tests.synthetic_data.TinyMLP" in (run_dir / "config.yaml").read_text()
    assert len((run_dir / "rounds.csv").read_text().strip().splitlines()) == 4  # header + 3 rounds


def test_seed_everything_seeds_the_data_and_the_acquisition_unless_set(tmp_path: Path,
                                                                      tiny_fashion_mnist: Path) -> None:
    import yaml

    def run(name: str, *extra: str) -> tuple[dict, dict]:
        main(["fit", "--config", QUICKSTART, *_tiny_overrides(tmp_path, tiny_fashion_mnist),
              "--trainer.logger.init_args.name", name, "--acquisition.num_rounds", "1", *extra])
        run_dir = tmp_path / "runs" / name / "version_0"
        labeled = json.loads((run_dir / "labeled_indices.json").read_text())
        return yaml.safe_load((run_dir / "config.yaml").read_text()), labeled

    config_1, labeled_1 = run("seed1", "--seed_everything", "1")
    assert config_1["data"]["init_args"]["seed"] == 1 and config_1["acquisition"]["seed"] == 1
    config_2, labeled_2 = run("seed2", "--seed_everything", "2")
    assert config_2["data"]["init_args"]["seed"] == 2 and config_2["acquisition"]["seed"] == 2
    assert labeled_1["indices_by_round"]["0"] != labeled_2["indices_by_round"]["0"]  # another initial set
    explicit, labeled_explicit = run("explicit", "--seed_everything", "2", "--data.init_args.seed", "1")
    assert explicit["data"]["init_args"]["seed"] == 1 and explicit["acquisition"]["seed"] == 2
    assert labeled_explicit["indices_by_round"]["0"] == labeled_1["indices_by_round"]["0"]


def test_ckpt_path_last_without_a_run_is_a_one_line_error(tmp_path: Path, tiny_fashion_mnist: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", QUICKSTART, *_tiny_overrides(tmp_path, tiny_fashion_mnist), "--ckpt_path", "last"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "saal: error: --ckpt_path last: no run to resume" in error and "Traceback" not in error
    assert not (tmp_path / "runs").exists()


def test_resume_logs_into_the_run_it_resumes(tmp_path: Path, tiny_fashion_mnist: Path) -> None:
    main(["fit", "--config", QUICKSTART, *_tiny_overrides(tmp_path, tiny_fashion_mnist)])
    run_dir = tmp_path / "runs" / "quickstart" / "version_0"
    metrics_before = (run_dir / "metrics.csv").read_text().splitlines()
    config_before = (run_dir / "config.yaml").read_text()
    # Resuming a finished run trains nothing more, in the same folder, keeping its config and metrics.
    main(["fit", "--config", QUICKSTART, *_tiny_overrides(tmp_path, tiny_fashion_mnist), "--ckpt_path", "last"])
    assert sorted(p.name for p in (tmp_path / "runs" / "quickstart").iterdir()) == ["version_0"]
    assert (run_dir / "config.yaml").read_text() == config_before
    assert (run_dir / "metrics.csv").read_text().splitlines()[: len(metrics_before)] == metrics_before
    assert len((run_dir / "rounds.csv").read_text().splitlines()) == 1 + 3


def test_saal_fit_needs_epochs_per_round(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", QUICKSTART, "--acquisition.epochs_per_round", "null"])
    assert exit_info.value.code != 0
    assert "set acquisition.epochs_per_round" in capsys.readouterr().err
