"""Real ``saal fit`` subprocesses killed with SIGKILL or stopped with SIGTERM, then resumed with the README's
command (``saal fit --config X --ckpt_path last``): the result must be the uninterrupted run's, every round
recorded exactly once; a resume with a changed option must be refused and change nothing."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.synthetic_data import write_fashion

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "configs" / "quickstart.yaml"
# One thread per process, so that every run computes identically whatever else the machine is doing.
ENV = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
ROUNDS = 3  # acquisition rounds after round 0, 2 epochs each: epochs 0-1 are round 0, 2-3 round 1, ...


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_fashion(root / "FashionMNIST" / "raw", compressed=False, train_count=200, test_count=40)
    return root


def write_config(folder: Path, data_root: Path, before_checkpoint: list | None = None,
                 extra: list | None = None) -> Path:
    """The quickstart config, made tiny, with fault callbacks; written to ``folder/config.yaml``."""
    config = yaml.safe_load(QUICKSTART.read_text())
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(folder / "runs")
    config["trainer"]["enable_progress_bar"] = False
    callbacks = [c for c in config["trainer"]["callbacks"] if not c["class_path"].endswith("RichProgressBar")]
    checkpoint_at = next(i for i, c in enumerate(callbacks) if c["class_path"].endswith("ModelCheckpoint"))
    callbacks[checkpoint_at:checkpoint_at] = before_checkpoint or []
    config["trainer"]["callbacks"] = callbacks + (extra or [])
    config["data"]["init_args"].update(root=str(data_root), batch_size=8, eval_batch_size=64)
    config["acquisition"].update(num_rounds=ROUNDS, epochs_per_round=2, query_size=5, pool_size=30)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def fault(name: str, marker: Path, **init_args) -> dict:
    return {"class_path": f"tests.fault_points.{name}", "init_args": {"marker": str(marker), **init_args}}


def saal_fit(config: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "saal_lightning", "fit", "--config", str(config), *extra],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)


def outcome(folder: Path) -> tuple[dict, list[dict[str, str]]]:
    """The one run's ``labeled_indices.json`` and ``rounds.csv`` rows (there must be exactly one version)."""
    runs = sorted((folder / "runs" / "quickstart").glob("version_*"))
    assert [run.name for run in runs] == ["version_0"], runs
    with open(runs[0] / "rounds.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    return json.loads((runs[0] / "labeled_indices.json").read_text()), rows


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> tuple[dict, list[dict[str, str]]]:
    folder = tmp_path_factory.mktemp("uninterrupted")
    result = saal_fit(write_config(folder, data_root))
    assert result.returncode == 0, result.stderr[-3000:]
    return outcome(folder)


def assert_same_experiment(resumed: tuple[dict, list], reference: tuple[dict, list]) -> None:
    (labeled, rows), (expected_labeled, expected_rows) = resumed, reference
    assert [int(row["round"]) for row in rows] == list(range(ROUNDS + 1))  # every round exactly once
    assert labeled["indices_by_round"] == expected_labeled["indices_by_round"]
    assert labeled["num_labeled"] == 20 + ROUNDS * 5
    assert [row["test_acc"] for row in rows] == [row["test_acc"] for row in expected_rows]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    ("fault_name", "where", "init_args"),
    [
        ("SignalDuringTraining", "extra", {"epoch": 3}),  # mid-round 1: its second epoch
        ("SignalDuringAcquisition", "extra", {"acquisition": 1}),  # while round 1's pool is scored
        ("SignalBeforeCheckpoint", "before_checkpoint", {"epoch": 3}),  # round 1's files written, not its ckpt
    ],
    ids=["during-training", "during-acquisition", "between-records-and-checkpoint"],
)
def test_a_sigkilled_run_resumes_to_the_uninterrupted_result(
    tmp_path: Path, data_root: Path, uninterrupted, fault_name: str, where: str, init_args: dict
) -> None:
    marker = tmp_path / "fired"
    config = write_config(tmp_path, data_root, **{where: [fault(fault_name, marker, **init_args)]})
    killed = saal_fit(config)
    assert killed.returncode == -signal.SIGKILL and marker.exists(), killed.stderr[-3000:]
    run_dir = tmp_path / "runs" / "quickstart" / "version_0"
    rounds_on_disk = len((run_dir / "rounds.csv").read_text().splitlines()) - 1
    assert rounds_on_disk == (2 if fault_name == "SignalBeforeCheckpoint" else 1)

    # A resume with a changed option is refused before training, naming it, and changes nothing.
    before = snapshot(tmp_path / "runs")
    refused = saal_fit(config, "--ckpt_path", "last", "--acquisition.query_size", "6")
    assert refused.returncode == 2
    assert "saal: error: Refusing to resume from" in refused.stderr
    assert "query_size: 5 in the checkpoint, 6 in this run" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert snapshot(tmp_path / "runs") == before

    resumed = saal_fit(config, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    if fault_name == "SignalBeforeCheckpoint":
        assert "do not match the checkpoint being resumed (rounds 0-0" in resumed.stderr
        assert "the checkpoint wins" in resumed.stderr
    assert_same_experiment(outcome(tmp_path), uninterrupted)


@pytest.mark.parametrize(
    ("where", "fault_name", "init_args", "rounds_recorded"),
    [
        ("extra", "SignalDuringAcquisition", {"acquisition": 1}, [0]),  # round 1's acquisition never finishes
        # Round 0's files are written when the signal comes: its checkpoint is still saved, then the run stops,
        # and the resume starts from that round-end checkpoint.
        ("before_checkpoint", "SignalBeforeCheckpoint", {"epoch": 1}, [0]),
    ],
    ids=["during-acquisition", "while-writing-files"],
)
def test_sigterm_stops_with_143_and_resumes(tmp_path: Path, data_root: Path, uninterrupted, where: str,
                                            fault_name: str, init_args: dict, rounds_recorded: list[int]) -> None:
    marker = tmp_path / "fired"
    config = write_config(tmp_path, data_root,
                          **{where: [fault(fault_name, marker, signal_name="SIGTERM", **init_args)]})
    stopped = saal_fit(config)
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert "saal: stopped by SIGTERM" in stopped.stderr and "--ckpt_path last" in stopped.stderr
    _, rows = outcome(tmp_path)
    assert [int(row["round"]) for row in rows] == rounds_recorded
    resumed = saal_fit(config, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_experiment(outcome(tmp_path), uninterrupted)


def test_an_outside_sigterm_stops_within_seconds_and_resumes(tmp_path: Path, data_root: Path, uninterrupted) -> None:
    config = write_config(tmp_path, data_root, extra=[{"class_path": "tests.fault_points.Throttle",
                                                       "init_args": {"seconds": 0.2}}])
    rounds_csv = tmp_path / "runs" / "quickstart" / "version_0" / "rounds.csv"
    process = subprocess.Popen([sys.executable, "-m", "saal_lightning", "fit", "--config", str(config)], cwd=REPO,
                               env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (rounds_csv.exists() and len(rounds_csv.read_text().splitlines()) >= 2):
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before round 0 was recorded"
        time.sleep(0.05)
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143, stderr[-3000:]
    assert time.monotonic() - sent < 10
    resumed = saal_fit(config, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_experiment(outcome(tmp_path), uninterrupted)
