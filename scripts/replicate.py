"""Replicate the paper's Table 1 for one data set: several strategies x optimizers x seeds, then one table.

    .venv/bin/python scripts/replicate.py --dataset fashion_mnist --optimizers adam sam   # the full protocol (GPU)
    .venv/bin/python scripts/replicate.py --quick --strategies saal saal_gradient random   # a CPU-sized version
    .venv/bin/python scripts/replicate.py --summarize-only --out runs/replicate           # re-tabulate finished runs

Each run is ``saal fit --config configs/<data set>/<strategy>_<optimizer>.yaml --seed_everything <seed>`` (which
seeds the training, the initial labeled set and the acquisition's pools), its records under ``--out``.
``saal_gradient`` is the published ``saal`` config (SAAL with diversity) with ``space: gradient``: the runner
compares the authors' 1-D seeding on the scores with seeding in BADGE's gradient space weighted by the score.
The table reports, like the paper, the mean and standard deviation over seeds of the best test accuracy over the
rounds (``best_test_acc``), next to the final round's accuracy and the mean acquisition time per round (the
paper's Figure 2).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from saal_lightning.cli import main as saal_main
from saal_lightning.reporting import read_rounds_csv
from saal_lightning.reporting.atomic_file import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
PAPER_STRATEGIES = ("random", "entropy", "coreset", "ll4al", "vaal", "badge", "saal")
# Variants that are a paper config plus overrides: name -> (config strategy, extra arguments).
VARIANTS = {"saal_gradient": ("saal", ["--acquisition.strategy.init_args.space", "gradient"])}
# A CPU-sized protocol: the small CNN, short rounds, a smaller pool.
QUICK_OVERRIDES = [
    "--model.backbone", "small_cnn", "--trainer.accelerator", "cpu",
    "--acquisition.num_rounds", "5", "--acquisition.epochs_per_round", "10", "--acquisition.pool_size", "500",
    "--acquisition.query_size", "20", "--data.init_args.batch_size", "16",
]


def run_arguments(dataset: str, strategy: str, optimizer: str, seed: int, out: Path, extra: Sequence[str]) -> list[str]:
    """The ``saal`` arguments of one run."""
    config_strategy, variant_args = VARIANTS.get(strategy, (strategy, []))
    config = REPO / "configs" / dataset / f"{config_strategy}_{optimizer}.yaml"
    if not config.exists():
        raise SystemExit(f"replicate: no config {config.relative_to(REPO)} (strategies: see configs/{dataset}/)")
    return [
        "fit", "--config", str(config), *variant_args,
        "--seed_everything", str(seed),  # also seeds the initial labels, training order and pools
        "--trainer.logger.init_args.save_dir", str(out / dataset),
        "--trainer.logger.init_args.name", f"{strategy}_{optimizer}",
        "--trainer.logger.init_args.version", f"seed{seed}",
        *extra,
    ]


def summarize(out: Path, dataset: str) -> list[dict[str, object]]:
    """One row per (strategy, optimizer) found under ``out/<dataset>``: mean/std over seeds, as in Table 1."""
    groups: dict[str, list[list[dict[str, str]]]] = {}
    for csv_path in sorted((out / dataset).glob("*/seed*/rounds.csv")):
        rows = read_rounds_csv(csv_path)
        if rows:
            groups.setdefault(csv_path.parent.parent.name, []).append(rows)
    summary = []
    for name, runs in groups.items():
        best = [100 * max(float(r["best_test_acc"]) for r in rows) for rows in runs]
        final = [100 * float(rows[-1]["test_acc"]) for rows in runs]
        times = [float(r["acquisition_seconds"]) for rows in runs for r in rows if r["acquisition_seconds"] != ""]
        summary.append({
            "run": name,
            "seeds": len(runs),
            "rounds": min(len(rows) for rows in runs),
            "best_mean": statistics.mean(best),
            "best_std": statistics.stdev(best) if len(best) > 1 else 0.0,
            "final_mean": statistics.mean(final),
            "acquisition_seconds": statistics.mean(times) if times else 0.0,
        })
    return summary


def print_summary(summary: list[dict[str, object]], dataset: str, out: Path) -> None:
    table = Table(title=f"{dataset}: best test accuracy over rounds (mean ± std over seeds)")
    for column in ("run", "seeds", "rounds", "best acc %", "final acc %", "acquisition s/round"):
        table.add_column(column, justify="left" if column == "run" else "right")
    lines = ["run,seeds,rounds,best_mean,best_std,final_mean,acquisition_seconds"]
    for row in summary:
        table.add_row(str(row["run"]), str(row["seeds"]), str(row["rounds"]),
                      f"{row['best_mean']:.1f} ± {row['best_std']:.1f}", f"{row['final_mean']:.1f}",
                      f"{row['acquisition_seconds']:.2f}")
        lines.append(",".join(str(row[k]) for k in ("run", "seeds", "rounds", "best_mean", "best_std",
                                                      "final_mean", "acquisition_seconds")))
    Console().print(table)
    atomic_write_text(out / dataset / "summary.csv", "\n".join(lines) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fashion_mnist", choices=("fashion_mnist", "svhn", "cifar10", "cifar100"))
    parser.add_argument("--strategies", nargs="+", default=[*PAPER_STRATEGIES, "saal_gradient"])
    parser.add_argument("--optimizers", nargs="+", default=["adam"], choices=("adam", "sam"))
    parser.add_argument("--seeds", nargs="+", type=int, default=[123, 456, 789])
    parser.add_argument("--out", type=Path, default=Path("runs/replicate"))
    parser.add_argument("--quick", action="store_true", help="a CPU-sized protocol (small CNN, 5 short rounds)")
    parser.add_argument("--summarize-only", action="store_true", help="only tabulate the runs under --out")
    parser.add_argument("--dry-run", action="store_true", help="print the saal commands without running them")
    args, extra = parser.parse_known_args(argv)
    extra = (QUICK_OVERRIDES if args.quick else []) + extra  # unknown arguments go to every `saal fit`
    sys.argv = sys.argv[:1]  # parsed: LightningCLI must see only the arguments this script passes it
    if not args.summarize_only:
        for optimizer in args.optimizers:
            for strategy in args.strategies:
                for seed in args.seeds:
                    run_args = run_arguments(args.dataset, strategy, optimizer, seed, args.out, extra)
                    if args.dry_run:
                        print("saal " + " ".join(run_args))
                    else:
                        saal_main(run_args)
    if not args.dry_run:
        print_summary(summarize(args.out, args.dataset), args.dataset, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
