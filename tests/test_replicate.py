"""The replication runner: real `saal fit` processes for strategies x seeds, the Table-1 summary, skips and resumes."""

from __future__ import annotations

import csv
import json
import statistics
import sys
from pathlib import Path

import pytest
import yaml

from tests.synthetic_data import write_fashion

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import replicate  # noqa: E402  (scripts/replicate.py)

CHECKPOINT = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
              "init_args": {"save_last": "link", "save_top_k": 1, "every_n_epochs": 1,
                            "save_on_train_epoch_end": True}}


def tiny(root: Path, callbacks: list[dict] | None = None) -> list[str]:
    """Overrides that make a run take seconds on the synthetic Fashion-MNIST under ``root``."""
    return ["--data.init_args.root", str(root), "--model.backbone", "small_cnn", "--trainer.accelerator", "cpu",
            "--acquisition.num_rounds", "2", "--acquisition.epochs_per_round", "1", "--acquisition.pool_size", "12",
            "--acquisition.query_size", "4", "--trainer.enable_progress_bar", "false",
            "--trainer.callbacks", json.dumps(callbacks if callbacks is not None else [CHECKPOINT])]


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    write_fashion(root / "FashionMNIST" / "raw", compressed=False, train_count=60, test_count=20)
    return root


def read_summary(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as handle:
        return {row["run"]: row for row in csv.DictReader(handle)}


def test_runner_tabulates_seeds_then_skips_finished_runs_and_refuses_changed_ones(
    tmp_path: Path, data_root: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    arguments = ["--strategies", "saal_diverse", "saal_diverse_gradient", "--seeds", "1", "2", "--out", str(out),
                 "--jobs", "2", *tiny(data_root)]
    assert replicate.main(arguments) == 0

    folder = out / "fashion_mnist"
    summary = read_summary(folder / "summary.csv")
    assert set(summary) == {"saal_diverse_adam", "saal_diverse_gradient_adam"}
    for name, row in summary.items():
        runs = [replicate.read_rounds_csv(folder / name / f"seed{s}" / "rounds.csv") for s in (1, 2)]
        assert [len(rows) for rows in runs] == [3, 3] and int(row["seeds"]) == 2
        best = [100 * max(float(r["best_test_acc"]) for r in rows) for rows in runs]
        final = [100 * float(rows[-1]["test_acc"]) for rows in runs]
        assert float(row["best_mean"]) == pytest.approx(statistics.mean(best))
        assert float(row["best_std"]) == pytest.approx(statistics.stdev(best))
        assert float(row["final_std"]) == pytest.approx(statistics.stdev(final))
        train = [float(r["train_seconds"]) for rows in runs for r in rows]
        assert float(row["train_seconds"]) == pytest.approx(statistics.mean(train)) and float(row["train_seconds"]) > 0
        assert {r["strategy"] for rows in runs for r in rows} == {"saal_diverse"}
    # The paper's SAAL row is SAAL with diversity; the gradient-space variant has no paper number.
    assert summary["saal_diverse_adam"]["paper_table1"] == "85.8 ± 0.8"
    assert summary["saal_diverse_gradient_adam"]["paper_table1"] == ""
    config = yaml.safe_load((folder / "saal_diverse_gradient_adam" / "seed1" / "config.yaml").read_text())
    assert config["acquisition"]["strategy"]["init_args"]["space"] == "gradient"
    # --seed_everything alone seeds the initial labeled set and the pools too: two seeds, two initial sets.
    assert config["data"]["init_args"]["seed"] == 1 and config["acquisition"]["seed"] == 1
    initial = [json.loads((folder / "saal_diverse_adam" / f"seed{s}" / "labeled_indices.json").read_text())
               ["indices_by_round"]["0"] for s in (1, 2)]
    assert initial[0] != initial[1]
    for figure in ("learning_curves.png", "round_times.png"):
        assert (folder / figure).stat().st_size > 5000

    # A rerun starts nothing: every run is done.
    before = {path: path.stat().st_mtime_ns for path in folder.glob("*/seed*/**/*") if path.is_file()}
    assert len(before) > 20  # every run's records, config, metrics and checkpoints
    capsys.readouterr()
    assert replicate.main(arguments) == 0
    assert "4 of 4 runs already done; 0 to run" in capsys.readouterr().out
    assert {path: path.stat().st_mtime_ns for path in before} == before

    # The same folders with another option are another experiment: refused before anything runs.
    with pytest.raises(SystemExit, match="holds a finished run with other arguments") as refused:
        replicate.main([*arguments, "--acquisition.query_size", "3"])
    assert "--acquisition.query_size 3" in str(refused.value)
    assert {path: path.stat().st_mtime_ns for path in before} == before


def test_an_interrupted_run_resumes_to_the_result_of_an_uninterrupted_one(
    tmp_path: Path, data_root: Path, capsys: pytest.CaptureFixture
) -> None:
    killer = {"class_path": "tests.fault_points.SignalDuringTraining",
              "init_args": {"epoch": 2, "marker": str(tmp_path / "killed"), "signal_name": "SIGKILL"}}
    interrupted = ["--strategies", "entropy", "--seeds", "3", "--out", str(tmp_path / "interrupted"),
                   *tiny(data_root, [killer, CHECKPOINT])]
    assert replicate.main(interrupted) == 1  # killed during round 2's training: reported, not hidden
    run = tmp_path / "interrupted" / "fashion_mnist" / "entropy_adam" / "seed3"
    assert "entropy_adam seed 3: FAILED (exit -9)" in capsys.readouterr().out
    assert (tmp_path / "killed").exists() and not (run / replicate.RECORD).exists()
    assert replicate.main(interrupted) == 0  # resumed from the round-1 checkpoint
    assert "entropy_adam seed 3: resumed, done" in capsys.readouterr().out

    uninterrupted = ["--strategies", "entropy", "--seeds", "3", "--out", str(tmp_path / "whole"), *tiny(data_root)]
    assert replicate.main(uninterrupted) == 0
    whole = tmp_path / "whole" / "fashion_mnist" / "entropy_adam" / "seed3"
    assert ([(r["round"], r["num_labeled"], r["test_acc"]) for r in replicate.read_rounds_csv(run / "rounds.csv")]
            == [(r["round"], r["num_labeled"], r["test_acc"]) for r in replicate.read_rounds_csv(whole / "rounds.csv")])
    assert (json.loads((run / "labeled_indices.json").read_text())["indices_by_round"]
            == json.loads((whole / "labeled_indices.json").read_text())["indices_by_round"])


def test_dry_run_lists_one_command_per_run(capsys: pytest.CaptureFixture) -> None:
    replicate.main(["--dry-run", "--strategies", "random", "badge", "--optimizers", "adam", "sam", "--seeds", "7"])
    commands = capsys.readouterr().out.strip().splitlines()
    assert len(commands) == 4
    assert all("--seed_everything 7" in c for c in commands)
    assert any("configs/fashion_mnist/badge_sam.yaml" in c for c in commands)


def test_the_cpu_preset_scales_the_protocol_down_as_documented(capsys: pytest.CaptureFixture) -> None:
    replicate.main(["--dry-run", "--preset", "cpu", "--seeds", "1"])
    commands = capsys.readouterr().out.strip().splitlines()
    assert [c.split("configs/fashion_mnist/")[1].split(".yaml")[0] for c in commands] == [
        "random_adam", "entropy_adam", "badge_adam", "saal_adam", "saal_diverse_adam", "saal_diverse_adam"]
    assert all("--model.backbone wide_cnn" in c and "--acquisition.num_rounds 30" in c
               and "--acquisition.epochs_per_round 20" in c for c in commands)
    assert "--acquisition.strategy.init_args.space gradient" in commands[-1]


def test_unknown_strategy_names_the_missing_config() -> None:
    with pytest.raises(SystemExit, match="no config configs/fashion_mnist/nope_adam.yaml"):
        replicate.main(["--dry-run", "--strategies", "nope", "--seeds", "1"])
