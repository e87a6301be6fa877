"""Replicate the paper's Table 1 for one data set: several strategies x optimizers x seeds, then one table.

    .venv/bin/python scripts/replicate.py --dataset cifar10 --optimizers adam sam     # the paper's protocol (GPU)
    .venv/bin/python scripts/replicate.py --preset cpu --jobs 2                        # Fashion-MNIST, 2 CPU cores
    .venv/bin/python scripts/replicate.py --preset quick --strategies saal_diverse random   # minutes, a smoke run
    .venv/bin/python scripts/replicate.py --summarize-only --preset cpu                 # re-tabulate finished runs

Each run is ``saal fit --config configs/<data set>/<strategy>_<optimizer>.yaml --seed_everything <seed>`` (which
seeds the training, the initial labeled set and the acquisition's pools) in its own process, its records in
``--out/<data set>/<strategy>_<optimizer>[_<tag>]/seed<seed>/``. ``--jobs N`` runs N at a time, each with
``cores / N`` threads. A run that finished is skipped on a rerun (its ``replicate.json`` records the exact
arguments; a rerun with other arguments into the same folder is refused), a run that was interrupted resumes
from its last round checkpoint (``--ckpt_path last``), so the runner can be killed and restarted at any time.

``saal_diverse_gradient`` is the ``saal_diverse`` config with ``space: gradient``: k-means++ seeding in BADGE's
gradient space weighted by the score instead of the authors' 1-D seeding on the scores.

The table reports, like the paper, the mean and standard deviation over seeds of the best test accuracy over the
rounds (``best_test_acc``), next to the final round's accuracy, the paper's Table-1 number for the same row
(its ``SAAL`` row is ``saal_diverse``: the authors' released command) and the mean training and acquisition
seconds per round (the paper's Figure 2). ``summary.csv``, ``summary.md`` (a Markdown table),
``learning_curves.png`` and ``round_times.png`` are written beside the runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from saal_lightning.reporting import read_rounds_csv
from saal_lightning.reporting.atomic_file import atomic_write_text
from saal_lightning.reporting.learning_curve import plot_mean_learning_curves, plot_round_times

REPO = Path(__file__).resolve().parents[1]
PAPER_STRATEGIES = ("random", "entropy", "coreset", "ll4al", "vaal", "badge", "saal_diverse")
# Variants that are a paper config plus overrides: name -> (config strategy, extra arguments).
VARIANTS = {"saal_diverse_gradient": ("saal_diverse", ["--acquisition.strategy.init_args.space", "gradient"])}

# A resumable checkpoint every 10 epochs: a divisor of every preset's epochs_per_round, so every round end has one.
_CPU_CHECKPOINTS = json.dumps([{
    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
    "init_args": {"save_last": "link", "save_top_k": 1, "every_n_epochs": 10, "save_on_train_epoch_end": True},
}])
PRESETS: dict[str, dict[str, object]] = {
    # The generated configs unchanged: ResNet-18, 100 rounds of 50 epochs (a GPU's work).
    "paper": {"overrides": [], "strategies": [*PAPER_STRATEGIES, "saal_diverse_gradient"]},
    # The paper's protocol scaled to two CPU cores and about two hours for six strategies x 3 seeds, 2 jobs:
    # 30 rounds instead of 100 (320 labels at the end instead of 1,020), 20 epochs per round instead of 50, and
    # the 420 k-parameter wide_cnn instead of the 11.2 M-parameter ResNet-18. Unchanged: 20 balanced initial
    # labels, 10 labels per round from a random 2,000-item pool, batch 10, Adam 1e-3 restarted every round from
    # the same initial weights, the adaptive ball with rho 0.05, the full 10,000-image test set every round.
    "cpu": {
        "overrides": ["--model.backbone", "wide_cnn", "--trainer.accelerator", "cpu",
                      "--acquisition.num_rounds", "30", "--acquisition.epochs_per_round", "20",
                      "--trainer.callbacks", _CPU_CHECKPOINTS, "--trainer.enable_progress_bar", "false"],
        "strategies": ["random", "entropy", "badge", "saal", "saal_diverse", "saal_diverse_gradient"],
    },
    # Minutes, for a smoke run: the small CNN, 5 short rounds, a 500-item pool.
    "quick": {
        "overrides": ["--model.backbone", "small_cnn", "--trainer.accelerator", "cpu",
                      "--acquisition.num_rounds", "5", "--acquisition.epochs_per_round", "10",
                      "--acquisition.pool_size", "500", "--acquisition.query_size", "20",
                      "--data.init_args.batch_size", "16",
                      "--trainer.callbacks", _CPU_CHECKPOINTS, "--trainer.enable_progress_bar", "false"],
        "strategies": ["random", "entropy", "badge", "saal", "saal_diverse", "saal_diverse_gradient"],
    },
}

# The paper's Table 1 (mean ± std over 3 seeds of the best accuracy over 100 rounds, ResNet-18), by
# (data set, optimizer) and our strategy name; the paper's "SAAL" row is the authors' Max_Diversity command.
PAPER_TABLE1: dict[tuple[str, str], dict[str, str]] = {
    (dataset, optimizer): dict(zip(("random", "entropy", "coreset", "ll4al", "vaal", "badge", "saal_diverse"),
                                   column, strict=True))
    for (dataset, optimizer), column in {
        ("fashion_mnist", "adam"): ("81.2 ± 0.5", "81.5 ± 1.4", "83.8 ± 0.7", "83.5 ± 1.8", "83.4 ± 0.1",
                                    "85.4 ± 0.6", "85.8 ± 0.8"),
        ("svhn", "adam"): ("72.4 ± 0.9", "73.1 ± 1.0", "75.3 ± 5.8", "75.1 ± 1.7", "73.4 ± 1.3", "74.9 ± 1.1",
                           "76.8 ± 0.7"),
        ("cifar10", "adam"): ("50.7 ± 1.5", "51.9 ± 1.8", "51.7 ± 1.0", "51.7 ± 0.4", "52.0 ± 0.9", "52.3 ± 2.2",
                              "54.4 ± 0.9"),
        ("cifar100", "adam"): ("43.3 ± 0.3", "44.4 ± 0.7", "44.4 ± 0.5", "43.9 ± 0.3", "44.8 ± 0.3", "45.7 ± 0.6",
                               "47.6 ± 0.9"),
        ("fashion_mnist", "sam"): ("83.7 ± 0.3", "84.1 ± 0.2", "84.4 ± 0.6", "83.2 ± 1.4", "84.1 ± 0.6",
                                   "86.2 ± 0.2", "86.3 ± 0.5"),
        ("svhn", "sam"): ("78.1 ± 1.1", "77.5 ± 3.2", "78.9 ± 1.3", "72.2 ± 0.2", "77.1 ± 0.8", "78.8 ± 0.9",
                          "78.8 ± 1.0"),
        ("cifar10", "sam"): ("52.6 ± 2.8", "54.6 ± 0.4", "53.9 ± 1.3", "50.2 ± 1.1", "53.1 ± 0.9", "56.8 ± 1.9",
                             "57.0 ± 1.1"),
        ("cifar100", "sam"): ("44.0 ± 0.7", "44.1 ± 1.0", "47.6 ± 1.4", "35.7 ± .01", "45.5 ± 0.4", "47.4 ± 0.7",
                              "48.4 ± 0.9"),
    }.items()
}
RECORD = "replicate.json"  # written into a run's folder when it finished


@dataclass(frozen=True)
class Run:
    """One ``saal fit`` of the table: where it logs and with which arguments."""

    dataset: str
    strategy: str
    optimizer: str
    seed: int
    tag: str
    arguments: tuple[str, ...]
    folder: Path

    @property
    def name(self) -> str:
        return f"{self.strategy}_{self.optimizer}" + (f"_{self.tag}" if self.tag else "")


def plan_run(dataset: str, strategy: str, optimizer: str, seed: int, out: Path, extra: Sequence[str],
             tag: str = "") -> Run:
    """The run of one table cell and seed; ``extra`` arguments go to its ``saal fit`` after the config's."""
    config_strategy, variant_args = VARIANTS.get(strategy, (strategy, []))
    config = Path("configs") / dataset / f"{config_strategy}_{optimizer}.yaml"  # runs start in the repository
    if not (REPO / config).exists():
        raise SystemExit(f"replicate: no config {config} (strategies: see configs/{dataset}/)")
    name = f"{strategy}_{optimizer}" + (f"_{tag}" if tag else "")
    arguments = (
        "fit", "--config", str(config), *variant_args,
        "--seed_everything", str(seed),  # also seeds the initial labels, training order and pools
        "--trainer.logger.init_args.save_dir", str(out / dataset),
        "--trainer.logger.init_args.name", name,
        "--trainer.logger.init_args.version", f"seed{seed}",
        *extra,
    )
    return Run(dataset, strategy, optimizer, seed, tag, arguments, out / dataset / name / f"seed{seed}")


def run_state(run: Run) -> str:
    """``"done"``, ``"resume"`` (a round checkpoint to go on from) or ``"new"``.

    Raises:
        SystemExit: when the folder holds a finished run with other arguments (another experiment).
    """
    record = run.folder / RECORD
    if record.exists():
        done_with = json.loads(record.read_text())["arguments"]
        if done_with != list(run.arguments):
            raise SystemExit(f"replicate: {run.folder} holds a finished run with other arguments:\n  "
                             f"{' '.join(done_with)}\nnot\n  {' '.join(run.arguments)}\nUse another --out or --tag.")
        return "done"
    return "resume" if (run.folder / "checkpoints" / "last.ckpt").exists() else "new"


def execute(run: Run, threads: int) -> int:
    """Run (or resume) one ``saal fit`` in its own process; its output goes to ``<folder>.log``."""
    state = run_state(run)
    if state == "done":
        return 0
    if state == "new" and run.folder.exists():
        # Killed before its first round checkpoint: nothing to resume from. Kept aside, never deleted.
        aside = run.folder.with_name(f"{run.folder.name}.incomplete-{int(time.time())}")
        run.folder.rename(aside)
        print(f"replicate: {run.folder} had no checkpoint to resume; moved to {aside.name}, starting again")
    arguments = [*run.arguments, *(["--ckpt_path", "last"] if state == "resume" else [])]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    run.folder.parent.mkdir(parents=True, exist_ok=True)
    log = run.folder.parent / f"{run.folder.name}.log"
    started = time.monotonic()
    with open(log, "a", encoding="utf-8") as handle:
        code = subprocess.run([sys.executable, "-m", "saal_lightning", *arguments], env=env, stdout=handle,
                              stderr=subprocess.STDOUT, cwd=REPO, check=False).returncode
    if code == 0:
        atomic_write_text(run.folder / RECORD, json.dumps({"arguments": list(run.arguments), "strategy": run.strategy,
                                                           "optimizer": run.optimizer, "tag": run.tag}) + "\n")
    print(f"replicate: {run.name} seed {run.seed}: {'resumed, ' if state == 'resume' else ''}"
          f"{'done' if code == 0 else f'FAILED (exit {code}), see {log}'} in {time.monotonic() - started:.0f} s",
          flush=True)
    return code


def execute_all(runs: Sequence[Run], jobs: int) -> int:
    """Run every run, ``jobs`` at a time with ``cores / jobs`` threads each; 1 when any failed."""
    threads = max(1, (os.cpu_count() or 1) // jobs)
    todo = [run for run in runs if run_state(run) != "done"]  # refuses changed arguments before starting any
    print(f"replicate: {len(runs) - len(todo)} of {len(runs)} runs already done; {len(todo)} to run, "
          f"{jobs} at a time with {threads} thread(s) each", flush=True)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        codes = list(pool.map(lambda run: execute(run, threads), todo))
    return 1 if any(codes) else 0


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(out: Path, dataset: str) -> list[dict[str, object]]:
    """One row per run name found under ``out/<dataset>``: mean/std over its finished seeds, as in Table 1.

    Unfinished runs (no ``replicate.json`` yet) are left out, never averaged in with fewer rounds; they are named
    in the ``unfinished`` column.
    """
    groups: dict[str, list[list[dict[str, str]]]] = {}
    records: dict[str, dict[str, str]] = {}
    unfinished: dict[str, list[str]] = {}
    for csv_path in sorted((out / dataset).glob("*/seed*/rounds.csv")):
        name, record = csv_path.parent.parent.name, csv_path.parent / RECORD
        if not record.exists():
            unfinished.setdefault(name, []).append(csv_path.parent.name)
            continue
        records[name] = json.loads(record.read_text())
        groups.setdefault(name, []).append(read_rounds_csv(csv_path))
    summary = []
    for name, runs in groups.items():
        best_mean, best_std = _mean_std([100 * max(float(r["best_test_acc"]) for r in rows) for rows in runs])
        final_mean, final_std = _mean_std([100 * float(rows[-1]["test_acc"]) for rows in runs])
        acquisition = [float(r["acquisition_seconds"]) for rows in runs for r in rows if r["acquisition_seconds"]]
        training = [float(r["train_seconds"]) for rows in runs for r in rows if r.get("train_seconds")]
        record = records.get(name, {})
        paper = PAPER_TABLE1.get((dataset, record.get("optimizer", "")), {}).get(record.get("strategy", ""), "")
        summary.append({
            "run": name,
            "tag": record.get("tag", ""),
            "seeds": len(runs),
            "rounds": min(len(rows) for rows in runs),
            "best_mean": best_mean, "best_std": best_std,
            "final_mean": final_mean, "final_std": final_std,
            "paper_table1": paper if not record.get("tag") else "",
            "train_seconds": statistics.mean(training) if training else 0.0,
            "acquisition_seconds": statistics.mean(acquisition) if acquisition else 0.0,
            "unfinished": " ".join(unfinished.get(name, [])),
            "finished_runs": runs,  # the rows of each finished seed, for the figures (not a CSV column)
        })
    return summary


SUMMARY_COLUMNS = ("run", "seeds", "rounds", "best_mean", "best_std", "final_mean", "final_std", "paper_table1",
                   "train_seconds", "acquisition_seconds", "unfinished")


def print_summary(summary: list[dict[str, object]], dataset: str, out: Path, figure_tag: str = "") -> None:
    """Print the table, write ``summary.csv`` and the two figures under ``out/<dataset>``.

    The table has every run; the figures only the runs with ``figure_tag`` (by default the untagged ones), so
    that a study's variants beside the preset's runs do not bury its six curves.
    """
    table = Table(title=f"{dataset}: test accuracy % (mean ± std over seeds)")
    for column in ("run", "seeds", "rounds", "best", "final", "paper Table 1", "train s/round", "acq. s/round"):
        table.add_column(column, justify="left" if column == "run" else "right")
    lines = [",".join(SUMMARY_COLUMNS)]
    markdown = ["| run | seeds | rounds | best acc % | final acc % | paper Table 1 | train s/round | acq. s/round |",
                "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in summary:
        markdown.append(f"| `{row['run']}` | {row['seeds']} | {row['rounds']} | {row['best_mean']:.1f} ± "
                        f"{row['best_std']:.1f} | {row['final_mean']:.1f} ± {row['final_std']:.1f} | "
                        f"{row['paper_table1'] or '—'} | {row['train_seconds']:.1f} | "
                        f"{row['acquisition_seconds']:.2f} |")
        table.add_row(str(row["run"]), str(row["seeds"]), str(row["rounds"]),
                      f"{row['best_mean']:.1f} ± {row['best_std']:.1f}",
                      f"{row['final_mean']:.1f} ± {row['final_std']:.1f}", str(row["paper_table1"]),
                      f"{row['train_seconds']:.1f}", f"{row['acquisition_seconds']:.2f}")
        lines.append(",".join(str(row[k]) for k in SUMMARY_COLUMNS))
    Console(width=max(120, Console().width)).print(table)
    folder = out / dataset
    atomic_write_text(folder / "summary.csv", "\n".join(lines) + "\n")
    atomic_write_text(folder / "summary.md", "\n".join(markdown) + "\n")  # the README's table, pasted as is
    drawn = [row for row in summary if row["tag"] == figure_tag]
    curves = {str(row["run"]): row["finished_runs"] for row in drawn}
    plot_mean_learning_curves(curves, folder / "learning_curves.png", title=f"{dataset}: mean ± std over seeds")
    plot_round_times({str(row["run"]): (float(row["train_seconds"]), float(row["acquisition_seconds"]))  # type: ignore[arg-type]
                      for row in drawn}, folder / "round_times.png")



def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--dataset", default="fashion_mnist", choices=("fashion_mnist", "svhn", "cifar10", "cifar100"))
    parser.add_argument("--preset", default="paper", choices=sorted(PRESETS),
                        help="paper: the generated configs as they are; cpu: 2 CPU cores, about 2 h; quick: minutes")
    parser.add_argument("--strategies", nargs="+", help="default: the preset's")
    parser.add_argument("--optimizers", nargs="+", default=["adam"], choices=("adam", "sam"))
    parser.add_argument("--seeds", nargs="+", type=int, default=[123, 456, 789])
    parser.add_argument("--out", type=Path, help="default: runs/replicate_<preset>")
    parser.add_argument("--tag", default="", help="appended to the run names (for variants of the protocol)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (each with cores / jobs threads)")
    parser.add_argument("--summarize-only", action="store_true", help="only tabulate the runs under --out")
    parser.add_argument("--dry-run", action="store_true", help="print the saal commands without running them")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args, extra = build_parser().parse_known_args(argv)  # unknown arguments go to every `saal fit`
    if args.jobs < 1:
        raise SystemExit(f"replicate: --jobs must be at least 1, got {args.jobs}")
    preset = PRESETS[args.preset]
    out = (args.out or Path(f"runs/replicate_{args.preset}")).resolve()
    strategies = args.strategies or list(preset["strategies"])  # type: ignore[call-overload]
    overrides = [*preset["overrides"], *extra]  # type: ignore[misc]
    runs = [plan_run(args.dataset, strategy, optimizer, seed, out, overrides, args.tag)
            for optimizer in args.optimizers for strategy in strategies for seed in args.seeds]
    if args.dry_run:
        for run in runs:
            print("saal " + " ".join(run.arguments))
        return 0
    code = 0 if args.summarize_only else execute_all(runs, args.jobs)
    print_summary(summarize(out, args.dataset), args.dataset, out, figure_tag=args.tag)
    return code


if __name__ == "__main__":
    sys.exit(main())
