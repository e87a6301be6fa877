"""The replication runner: real `saal fit` runs for two strategies x two seeds, then the Table-1 summary."""

from __future__ import annotations

import csv
import json
import statistics
import sys
from pathlib import Path

import pytest
import yaml

from saal_lightning.data import vision_datasets
from tests.synthetic_data import write_fashion

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import replicate  # noqa: E402  (scripts/replicate.py)

TINY = ["--model.backbone", "small_cnn", "--trainer.accelerator", "cpu", "--acquisition.num_rounds", "1",
        "--acquisition.epochs_per_round", "1", "--acquisition.pool_size", "12", "--acquisition.query_size", "4",
        "--trainer.callbacks", "[]", "--trainer.enable_progress_bar", "false"]


def test_runner_compares_saal_seeding_spaces_over_seeds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    debian = tmp_path / "debian"
    write_fashion(debian, compressed=True, train_count=60, test_count=20)
    monkeypatch.setattr(vision_datasets, "DEBIAN_FASHION_MNIST_DIR", debian)
    out = tmp_path / "out"
    assert replicate.main(["--strategies", "saal", "saal_gradient", "--seeds", "1", "2", "--out", str(out),
                           "--data.init_args.root", str(tmp_path / "data"), *TINY]) == 0

    with open(out / "fashion_mnist" / "summary.csv", newline="") as handle:
        summary = {row["run"]: row for row in csv.DictReader(handle)}
    assert set(summary) == {"saal_adam", "saal_gradient_adam"}
    for name, row in summary.items():
        runs = [replicate.read_rounds_csv(out / "fashion_mnist" / name / f"seed{s}" / "rounds.csv") for s in (1, 2)]
        assert [len(rows) for rows in runs] == [2, 2] and int(row["seeds"]) == 2
        best = [100 * max(float(r["best_test_acc"]) for r in rows) for rows in runs]
        assert float(row["best_mean"]) == pytest.approx(statistics.mean(best))
        assert float(row["best_std"]) == pytest.approx(statistics.stdev(best))
        assert {r["strategy"] for rows in runs for r in rows} == {"saal_diverse"}
    config = yaml.safe_load((out / "fashion_mnist" / "saal_gradient_adam" / "seed1" / "config.yaml").read_text())
    assert config["acquisition"]["strategy"]["init_args"]["space"] == "gradient"
    # --seed_everything alone seeds the initial labeled set and the pools too: two seeds, two initial sets.
    assert config["data"]["init_args"]["seed"] == 1 and config["acquisition"]["seed"] == 1
    initial = [json.loads((out / "fashion_mnist" / "saal_adam" / f"seed{s}" / "labeled_indices.json").read_text())
               ["indices_by_round"]["0"] for s in (1, 2)]
    assert initial[0] != initial[1]


def test_dry_run_lists_one_command_per_run(capsys: pytest.CaptureFixture) -> None:
    replicate.main(["--dry-run", "--strategies", "random", "badge", "--optimizers", "adam", "sam", "--seeds", "7"])
    commands = capsys.readouterr().out.strip().splitlines()
    assert len(commands) == 4
    assert all("--seed_everything 7" in c for c in commands)
    assert any("configs/fashion_mnist/badge_sam.yaml" in c for c in commands)


def test_unknown_strategy_names_the_missing_config() -> None:
    with pytest.raises(SystemExit, match="no config configs/fashion_mnist/nope_adam.yaml"):
        replicate.main(["--dry-run", "--strategies", "nope", "--seeds", "1"])
