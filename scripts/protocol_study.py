"""Which protocol choices move SAAL with diversity against random sampling at CPU scale, one at a time.

    .venv/bin/python scripts/protocol_study.py --jobs 2             # the cpu preset's table first, then the factors
    .venv/bin/python scripts/protocol_study.py --summarize-only     # the comparison from finished runs

It writes ``study.md`` (the per-seed gaps) and ``study_curves.png`` (a panel per factor, its SAAL-with-diversity
and random learning curves) beside the runs.

The baseline is ``scripts/replicate.py --preset cpu`` (wide_cnn, 30 rounds of 20 epochs, 2,000-item pools, the
adaptive ball, ``mode: max``, weights restarted every round). Each factor changes one of these for
``saal_diverse`` and, where the change affects random sampling too, for ``random``; the runs share the preset's
folders and seeds, so a factor's rows are compared with the baseline's on the same initial sets. Runs are planned
in priority order (the preset, model capacity, then the other factors) and resumable like the runner's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import replicate  # noqa: E402  (scripts/replicate.py)
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from saal_lightning.reporting import read_rounds_csv  # noqa: E402
from saal_lightning.reporting.atomic_file import atomic_write_text  # noqa: E402
from saal_lightning.reporting.learning_curve import plot_mean_learning_curve_panels  # noqa: E402


def _wide_cnn(width: int) -> list[str]:
    return ["--model.backbone", json.dumps({"class_path": "saal_lightning.models.backbones.WideCNN",
                                            "init_args": {"num_classes": 10, "in_channels": 1, "width": width}})]


# tag: (what it changes, strategies it runs, arguments after the preset's), in the order they are run.
FACTORS: dict[str, tuple[str, tuple[str, ...], list[str]]] = {
    "small_cnn": ("model: small_cnn, 40 k parameters", ("random", "saal_diverse"), ["--model.backbone", "small_cnn"]),
    "width8": ("model: WideCNN width 8, 100 k parameters", ("random", "saal_diverse"), _wide_cnn(8)),
    "paper_ball": ("ball: the paper's rho g/||g|| instead of the adaptive one", ("saal_diverse",),
                   ["--acquisition.strategy.init_args.adaptive", "false"]),
    "mode_diff": ("score: mode diff (perturbed minus clean loss) instead of max", ("saal_diverse",),
                  ["--acquisition.strategy.init_args.mode", "diff"]),
    "warm_start": ("training: weights carried over between rounds (no restart)", ("random", "saal_diverse"),
                   ["--acquisition.reset_weights", "false"]),
    "epochs10": ("training: 10 epochs per round instead of 20", ("random", "saal_diverse"),
                 ["--acquisition.epochs_per_round", "10"]),
    "pool500": ("pool: 500 items per round instead of 2,000", ("saal_diverse",), ["--acquisition.pool_size", "500"]),
}
BASELINE = ("model: wide_cnn, 420 k parameters (the cpu preset)", ("random", "saal_diverse"), [])


def plan(out: Path, seeds: Sequence[int], factor_seeds: Sequence[int]) -> list[replicate.Run]:
    """The preset's runs, then each factor's, in priority order."""
    preset = replicate.PRESETS["cpu"]
    overrides: list[str] = list(preset["overrides"])  # type: ignore[call-overload]
    # The preset's rows, the paper's SAAL row and its baseline first, so that an interrupted study has them.
    order = ["random", "saal_diverse", "saal", "entropy", "badge", "saal_diverse_gradient"]
    assert sorted(order) == sorted(preset["strategies"])  # type: ignore[arg-type]
    runs = [replicate.plan_run("fashion_mnist", strategy, "adam", seed, out, overrides)
            for strategy in order for seed in seeds]
    # The smallest model first, with every seed; then the scoring factors (cheap to test, closest to the paper's
    # claim) and the middle width; then the training factors; every factor on two seeds before any gets its
    # third, so that an interrupted study has compared as many factors as possible.
    batches = [(["small_cnn"], seeds), (["paper_ball", "mode_diff"], factor_seeds[:2]), (["width8"], seeds),
               (["warm_start", "epochs10", "pool500"], factor_seeds[:2]),
               (["paper_ball", "mode_diff", "warm_start", "epochs10", "pool500"], factor_seeds[2:])]
    for tags, chosen in batches:
        for tag in tags:
            _, strategies, arguments = FACTORS[tag]
            runs += [replicate.plan_run("fashion_mnist", strategy, "adam", seed, out, [*overrides, *arguments], tag)
                     for strategy in strategies for seed in chosen]
    return runs


def _best_and_final(folder: Path, seed: int) -> tuple[float, float] | None:
    path = folder / f"seed{seed}" / "rounds.csv"
    if not (folder / f"seed{seed}" / replicate.RECORD).exists():
        return None  # unfinished: not compared
    rows = read_rounds_csv(path)
    return 100 * max(float(r["best_test_acc"]) for r in rows), 100 * float(rows[-1]["test_acc"])


def _compared_folders(out: Path) -> dict[str, tuple[str, Path, Path]]:
    """Per factor (``baseline`` first): what it changes, its SAAL-with-diversity folder and its random folder.

    A factor that runs random sampling too is compared with its own random runs, any other with the baseline's.
    """
    base = out / "fashion_mnist"
    folders = {}
    for tag, (change, strategies, _) in {"": BASELINE, **FACTORS}.items():
        suffix = f"_{tag}" if tag else ""
        folders[tag or "baseline"] = (change, base / f"saal_diverse_adam{suffix}",
                                      base / f"random_adam{suffix if 'random' in strategies else ''}")
    return folders


def _gaps_by_seed(saal_folder: Path, random_folder: Path, seeds: Sequence[int]) -> dict[int, tuple[tuple, tuple]]:
    """``{seed: ((saal best, saal final), (random best, random final))}`` for the seeds both runs finished."""
    pairs = {seed: (_best_and_final(saal_folder, seed), _best_and_final(random_folder, seed)) for seed in seeds}
    return {seed: (saal, rand) for seed, (saal, rand) in pairs.items() if saal is not None and rand is not None}


def compare(out: Path, seeds: Sequence[int]) -> list[dict[str, object]]:
    """Per factor: SAAL-with-diversity and random (the factor's, or the baseline's), mean over finished seeds.

    ``baseline_gap_best`` is the baseline's best-accuracy gap on the same seeds as the factor's, so that a factor
    with fewer finished seeds is compared with the baseline on those seeds, not on all of them.
    """
    folders = _compared_folders(out)
    baseline = _gaps_by_seed(*folders["baseline"][1:], seeds)
    rows = []
    for factor, (change, saal_folder, random_folder) in folders.items():
        done = _gaps_by_seed(saal_folder, random_folder, seeds)
        if not done:
            continue
        row: dict[str, object] = {"factor": factor, "change": change, "seeds": len(done),
                                  "compared_seeds": list(done)}
        for position, measure in enumerate(("best", "final")):
            gaps = [saal[position] - rand[position] for saal, rand in done.values()]
            row[f"saal_{measure}"] = statistics.mean(saal[position] for saal, _ in done.values())
            row[f"random_{measure}"] = statistics.mean(rand[position] for _, rand in done.values())
            row[f"gap_{measure}"] = statistics.mean(gaps)
            row[f"gap_{measure}_std"] = statistics.stdev(gaps) if len(gaps) > 1 else 0.0
            row[f"ahead_{measure}"] = sum(gap > 0 for gap in gaps)  # seeds on which SAAL is strictly ahead
        same_seeds = [baseline[seed][0][0] - baseline[seed][1][0] for seed in done if seed in baseline]
        row["baseline_gap_best"] = statistics.mean(same_seeds) if len(same_seeds) == len(done) else None
        rows.append(row)
    return rows


def study_curves(out: Path, rows: list[dict[str, object]]) -> dict[str, dict[str, list[list[dict[str, str]]]]]:
    """Per row of :func:`compare`, its panel of ``study_curves.png``: the rounds of the seeds that row compares."""
    folders = _compared_folders(out)
    panels = {}
    for row in rows:
        change, saal_folder, random_folder = folders[str(row["factor"])]
        panels[f"{row['factor']}: {change}"] = {
            name: [read_rounds_csv(folder / f"seed{seed}" / "rounds.csv") for seed in row["compared_seeds"]]  # type: ignore[attr-defined]
            for name, folder in (("saal_diverse", saal_folder), ("random", random_folder))}
    return panels


def comparison_markdown(rows: list[dict[str, object]]) -> str:
    """The comparison as a Markdown table (``study.md``, pasted into the README as is)."""
    lines = ["| factor | change | seeds | SAAL div. best | random best | gap best | SAAL div. final | random final "
             "| gap final | seeds SAAL ahead (best, final) | baseline's gap best, same seeds |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        change = str(row["change"]).replace("|", "\\|")  # the paper's ||g|| would split the cell
        lines.append(f"| `{row['factor']}` | {change} | {row['seeds']} | {row['saal_best']:.1f} | "
                     f"{row['random_best']:.1f} | {row['gap_best']:+.1f} ± {row['gap_best_std']:.1f} | "
                     f"{row['saal_final']:.1f} | {row['random_final']:.1f} | "
                     f"{row['gap_final']:+.1f} ± {row['gap_final_std']:.1f} | "
                     f"{row['ahead_best']}/{row['seeds']}, {row['ahead_final']}/{row['seeds']} | "
                     f"{_signed(row['baseline_gap_best'])} |")
    return "\n".join(lines) + "\n"


def _signed(value: object) -> str:
    return "—" if value is None else f"{value:+.1f}"


def print_comparison(rows: list[dict[str, object]]) -> None:
    table = Table(title="SAAL with diversity minus random, accuracy points (mean ± std of the per-seed gap)")
    for column in ("factor", "change", "seeds", "saal best", "random best", "gap best", "saal final",
                   "random final", "gap final", "saal ahead", "baseline gap best"):
        table.add_column(column, justify="left" if column in ("factor", "change") else "right")
    for row in rows:
        table.add_row(str(row["factor"]), str(row["change"]), str(row["seeds"]),
                      *(f"{row[k]:.1f}" for k in ("saal_best", "random_best")),
                      f"{row['gap_best']:+.1f} ± {row['gap_best_std']:.1f}",
                      *(f"{row[k]:.1f}" for k in ("saal_final", "random_final")),
                      f"{row['gap_final']:+.1f} ± {row['gap_final_std']:.1f}",
                      f"{row['ahead_best']}/{row['seeds']}, {row['ahead_final']}/{row['seeds']}",
                      _signed(row["baseline_gap_best"]))
    Console(width=200).print(table)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/replicate_cpu"))
    parser.add_argument("--seeds", nargs="+", type=int, default=[123, 456, 789])
    parser.add_argument("--factor-seeds", nargs="+", type=int, default=[123, 456, 789],
                        help="seeds of the factors after model capacity")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--summarize-only", action="store_true")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    code = 0 if args.summarize_only else replicate.execute_all(plan(out, args.seeds, args.factor_seeds), args.jobs)
    replicate.print_summary(replicate.summarize(out, "fashion_mnist"), "fashion_mnist", out)
    rows = compare(out, args.seeds)
    print_comparison(rows)
    atomic_write_text(out / "fashion_mnist" / "study.md", comparison_markdown(rows))
    panels = study_curves(out, rows)
    if panels:
        plot_mean_learning_curve_panels(panels, out / "fashion_mnist" / "study_curves.png")
    return code


if __name__ == "__main__":
    sys.exit(main())
