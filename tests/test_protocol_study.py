"""The protocol study's plan and its per-seed comparison of SAAL with diversity against random sampling."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from saal_lightning.reporting.round_log import write_rounds_csv

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import protocol_study  # noqa: E402  (scripts/protocol_study.py)
import replicate  # noqa: E402


def finished_run(folder: Path, accuracies: list[float], done: bool = True) -> None:
    rows = [{"round": i, "num_labeled": 20 + 10 * i, "test_acc": a, "best_test_acc": max(accuracies[: i + 1])}
            for i, a in enumerate(accuracies)]
    write_rounds_csv(folder / "rounds.csv", rows)
    if done:
        (folder / replicate.RECORD).write_text(json.dumps({"arguments": []}))


def test_factors_are_compared_seed_by_seed_with_the_right_random_runs(tmp_path: Path) -> None:
    base = tmp_path / "fashion_mnist"
    finished_run(base / "random_adam" / "seed1", [0.5, 0.7])
    finished_run(base / "random_adam" / "seed2", [0.5, 0.6, 0.65])
    finished_run(base / "saal_diverse_adam" / "seed1", [0.5, 0.8])
    finished_run(base / "saal_diverse_adam" / "seed2", [0.5, 0.7, 0.6])
    # A factor that changes only SAAL is compared with the baseline's random runs.
    finished_run(base / "saal_diverse_adam_paper_ball" / "seed1", [0.5, 0.75])
    finished_run(base / "saal_diverse_adam_paper_ball" / "seed2", [0.5, 0.9], done=False)  # unfinished: left out
    # A factor that changes random sampling too is compared with its own random runs.
    finished_run(base / "random_adam_warm_start" / "seed1", [0.5, 0.55])
    finished_run(base / "saal_diverse_adam_warm_start" / "seed1", [0.5, 0.6])

    rows = {row["factor"]: row for row in protocol_study.compare(tmp_path, [1, 2])}
    assert set(rows) == {"baseline", "paper_ball", "warm_start"}
    baseline = rows["baseline"]
    assert baseline["seeds"] == 2
    assert baseline["gap_best"] == pytest.approx(((80 - 70) + (70 - 65)) / 2)
    assert baseline["gap_final"] == pytest.approx(((80 - 70) + (60 - 65)) / 2)
    assert rows["paper_ball"]["seeds"] == 1 and rows["paper_ball"]["gap_best"] == pytest.approx(75 - 70)
    assert rows["warm_start"]["gap_final"] == pytest.approx(60 - 55)
    markdown = protocol_study.comparison_markdown(list(rows.values()))
    assert "| `paper_ball` |" in markdown and "+5.0 ± 0.0" in markdown


def test_the_plan_runs_the_preset_first_then_one_change_at_a_time(tmp_path: Path) -> None:
    runs = protocol_study.plan(tmp_path, [1, 2, 3], [1, 2, 3])
    assert len({run.folder for run in runs}) == len(runs) == 18 + 6 + 4 + 6 + 10 + 7
    assert [run.name for run in runs[:6]] == ["random_adam"] * 3 + ["saal_diverse_adam"] * 3
    preset = list(replicate.PRESETS["cpu"]["overrides"])  # type: ignore[call-overload]
    for run in runs:
        assert list(run.arguments[-len(preset) - len(protocol_study.FACTORS.get(run.tag, ("", (), []))[2]):]
                    [:len(preset)]) == preset  # every factor's arguments come after the preset's
    ball = next(run for run in runs if run.tag == "paper_ball")
    assert ball.arguments[-2:] == ("--acquisition.strategy.init_args.adaptive", "false")
