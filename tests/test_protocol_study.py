"""The protocol study's plan and its per-seed comparison of SAAL with diversity against random sampling."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from saal_lightning.reporting.learning_curve import plot_mean_learning_curve_panels
from saal_lightning.reporting.round_log import write_rounds_csv

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import protocol_study  # noqa: E402  (scripts/protocol_study.py)
import replicate  # noqa: E402


def finished_run(folder: Path, accuracies: list[float], done: bool = True) -> None:
    rows = [{"round": i, "num_labeled": 20 + 10 * i, "test_acc": a, "best_test_acc": max(accuracies[: i + 1]),
             "train_seconds": 1.0, "acquisition_seconds": 0.5} for i, a in enumerate(accuracies)]
    write_rounds_csv(folder / "rounds.csv", rows)
    if done:
        name = folder.parent.name
        tag = next((t for t in protocol_study.FACTORS if name.endswith(f"_{t}")), "")
        (folder / replicate.RECORD).write_text(json.dumps({"arguments": [], "strategy": name.split("_adam")[0],
                                                           "optimizer": "adam", "tag": tag}))


def study_runs(tmp_path: Path) -> None:
    """Two seeds of the baseline, one factor that changes only SAAL, one that changes random sampling too."""
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


def test_factors_are_compared_seed_by_seed_with_the_right_random_runs(tmp_path: Path) -> None:
    study_runs(tmp_path)
    rows = {row["factor"]: row for row in protocol_study.compare(tmp_path, [1, 2])}
    assert set(rows) == {"baseline", "paper_ball", "warm_start"}
    baseline = rows["baseline"]
    assert baseline["seeds"] == 2
    assert baseline["gap_best"] == pytest.approx(((80 - 70) + (70 - 65)) / 2)
    assert baseline["gap_final"] == pytest.approx(((80 - 70) + (60 - 65)) / 2)
    assert rows["paper_ball"]["seeds"] == 1 and rows["paper_ball"]["gap_best"] == pytest.approx(75 - 70)
    # The baseline on the factor's seeds: seed 1 only for paper_ball (80 - 70), both for itself.
    assert rows["paper_ball"]["baseline_gap_best"] == pytest.approx(80 - 70)
    assert baseline["baseline_gap_best"] == pytest.approx(baseline["gap_best"])
    assert rows["warm_start"]["gap_final"] == pytest.approx(60 - 55)
    # Seeds on which SAAL is strictly ahead: best 80 > 70 and 70 > 65; final 80 > 70 but 60 < 65.
    assert (baseline["ahead_best"], baseline["ahead_final"]) == (2, 1)
    markdown = protocol_study.comparison_markdown(list(rows.values()))
    assert "| `paper_ball` |" in markdown and "+5.0 ± 0.0" in markdown and "| 2/2, 1/2 |" in markdown
    # Every row has as many cells as the header, even the paper's ball, whose description has ||g|| in it.
    lines = markdown.splitlines()
    cells = [len(re.split(r"(?<!\\)\|", line)) for line in lines]
    assert len(set(cells)) == 1, lines
    assert "g/\\|\\|g\\|\\|" in markdown


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


def test_the_study_figure_has_a_panel_per_compared_factor_with_the_seeds_the_table_compares(tmp_path: Path) -> None:
    study_runs(tmp_path)
    panels = protocol_study.study_curves(tmp_path, protocol_study.compare(tmp_path, [1, 2]))
    titles = list(panels)
    assert [title.split(":")[0] for title in titles] == ["baseline", "paper_ball", "warm_start"]
    baseline, ball, warm = (panels[title] for title in titles)
    assert [len(baseline["saal_diverse"]), len(baseline["random"])] == [2, 2]
    assert [float(run[-1]["test_acc"]) for run in baseline["saal_diverse"]] == [0.8, 0.6]
    # paper_ball: its one finished seed, against the baseline's random run on that seed.
    assert [[float(r["test_acc"]) for r in run] for run in ball["saal_diverse"]] == [[0.5, 0.75]]
    assert [[float(r["test_acc"]) for r in run] for run in ball["random"]] == [[0.5, 0.7]]
    # warm_start: against its own random run, not the baseline's.
    assert [[float(r["test_acc"]) for r in run] for run in warm["random"]] == [[0.5, 0.55]]

    path = plot_mean_learning_curve_panels(panels, tmp_path / "study_curves.png")
    assert path.stat().st_size > 5000
    with pytest.raises(ValueError, match="at least one panel"):
        plot_mean_learning_curve_panels({}, tmp_path / "empty.png")
    with pytest.raises(ValueError, match="columns must be at least 1, got 0"):
        plot_mean_learning_curve_panels(panels, tmp_path / "none.png", columns=0)
    assert not (tmp_path / "empty.png").exists() and not (tmp_path / "none.png").exists()


def test_the_runner_figures_draw_the_preset_runs_and_the_table_lists_every_run(tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    study_runs(tmp_path)
    drawn: dict[str, list[str]] = {}
    monkeypatch.setattr(replicate, "plot_mean_learning_curves",
                        lambda curves, output, title: drawn.setdefault("curves", list(curves)))
    monkeypatch.setattr(replicate, "plot_round_times", lambda times, output: drawn.setdefault("times", list(times)))
    summary = replicate.summarize(tmp_path, "fashion_mnist")
    replicate.print_summary(summary, "fashion_mnist", tmp_path)
    assert drawn == {"curves": ["random_adam", "saal_diverse_adam"], "times": ["random_adam", "saal_diverse_adam"]}
    table = (tmp_path / "fashion_mnist" / "summary.md").read_text()
    for name in ("random_adam", "random_adam_warm_start", "saal_diverse_adam_paper_ball", "saal_diverse_adam"):
        assert f"| `{name}` |" in table
    drawn.clear()
    replicate.print_summary(summary, "fashion_mnist", tmp_path, figure_tag="warm_start")
    assert drawn["curves"] == ["random_adam_warm_start", "saal_diverse_adam_warm_start"]
