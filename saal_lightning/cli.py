"""The ``saal`` command: LightningCLI with the acquisition callback under its own ``acquisition:`` key.

    saal fit --config configs/quickstart.yaml
    saal fit --config configs/quickstart.yaml --ckpt_path last      # resume the latest run of that config
    saal fit --config configs/fashion_mnist/saal_adam.yaml --acquisition.strategy entropy
    saal fit --config configs/quickstart.yaml --print_config

``saal fit`` runs the whole experiment in one fit (rounds of ``acquisition.epochs_per_round`` epochs), so a
checkpoint resumes it anywhere. What this module adds to LightningCLI:

* ``--ckpt_path last`` finds the newest ``version_N`` of the config's logger that holds
  ``checkpoints/last.ckpt``, and logs the resumed run into that same folder (Lightning alone would look in a new,
  empty ``version_N + 1`` and start from scratch). A resumed run keeps the ``config.yaml`` it started with.
* ``seed_everything`` seeds the data module's and the acquisition callback's seeds when they are left unset, and
  the saved ``config.yaml`` shows the values in use.
* A refused resume, answers that cannot be imported, a missing data set or a diverged training ends with one
  line on stderr (exit status 2, or 1 for divergence) instead of a traceback; SIGTERM stops the run with exit
  status 143, resumable with ``--ckpt_path last``.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

from lightning.pytorch.cli import ArgsType, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities.exceptions import SIGTERMException

from saal_lightning.callbacks.acquisition_callback import AcquisitionCallback
from saal_lightning.callbacks.resume_checks import ResumeMismatchError
from saal_lightning.callbacks.training_health import TrainingDivergedError
from saal_lightning.data.active_datamodule import ActiveDataModule
from saal_lightning.data.vision_datasets import DatasetNotFoundError
from saal_lightning.labeling.query_files import LabelImportError
from saal_lightning.models.classifier import ActiveClassifier

# The exit status of a process ended by SIGTERM, by shell convention (128 + 15).
SIGTERM_EXIT_STATUS = 143


class CheckpointNotFoundError(FileNotFoundError):
    """``--ckpt_path last`` found no run of this config to resume."""


class SAALCLI(LightningCLI):
    """LightningCLI that forces an :class:`AcquisitionCallback` and links data properties into the model."""

    def add_arguments_to_parser(self, parser) -> None:  # noqa: ANN001 - jsonargparse's parser type
        # A forced callback with its own key (not an entry of trainer.callbacks), so that its values can be
        # linked and overridden as --acquisition.query_size 10.
        parser.add_lightning_class_args(AcquisitionCallback, "acquisition")
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.in_channels", "model.in_channels", apply_on="instantiate")
        # The experiment's length is a property of the acquisition schedule: round 0 plus num_rounds rounds.
        parser.link_arguments(("acquisition.num_rounds", "acquisition.epochs_per_round"), "trainer.max_epochs",
                              compute_fn=total_epochs)
        # Rounds change the labeled set between epochs: the training loader must be rebuilt every epoch.
        parser.set_defaults({"trainer.reload_dataloaders_every_n_epochs": 1})

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        seed_unset_seeds(config)
        if self.subcommand == "fit" and config.get("ckpt_path") is not None:
            resolve_resumed_run(config)


def total_epochs(num_rounds: int, epochs_per_round: int | None) -> int:
    """Epochs of a whole experiment: the initial round plus ``num_rounds`` acquisition rounds."""
    if epochs_per_round is None:
        raise ValueError("saal fit runs every round inside one fit: set acquisition.epochs_per_round (the epochs "
                         "of one round, e.g. 20)")
    return epochs_per_round * (num_rounds + 1)


def seed_unset_seeds(config: Any) -> None:
    """Give ``data``'s and ``acquisition``'s unset seeds the value of ``seed_everything`` (0 when it is off)."""
    seed = config.get("seed_everything")
    seed = seed if isinstance(seed, int) and not isinstance(seed, bool) else 0
    data_args = config.get("data", {}).get("init_args")
    if data_args is not None and "seed" in data_args and data_args.get("seed") is None:
        data_args["seed"] = seed
    if config.get("acquisition") is not None and config.acquisition.get("seed") is None:
        config.acquisition["seed"] = seed


def resolve_resumed_run(config: Any) -> None:
    """Log a resumed run into the folder of the run it resumes.

    ``ckpt_path: last`` becomes the newest run's ``checkpoints/last.ckpt``; an explicit checkpoint inside a run's
    ``version_N/checkpoints/`` logs into ``version_N``. Only for a logger with ``save_dir`` and ``name``
    (CSVLogger, TensorBoardLogger) and checkpoints in the default ``<log_dir>/checkpoints``; anything else is left
    to Lightning's own lookup.

    Raises:
        CheckpointNotFoundError: when ``last`` finds no ``version_*/checkpoints/last.ckpt`` for the logger.
    """
    logger = config.get("trainer", {}).get("logger")
    init_args = getattr(logger, "init_args", None)
    if init_args is None or init_args.get("save_dir") is None or init_args.get("name") is None:
        return
    if any(getattr(callback, "init_args", None) is not None and callback.init_args.get("dirpath") is not None
           for callback in config.trainer.get("callbacks") or []):
        return
    base = Path(init_args.save_dir) / init_args.name
    version = init_args.get("version")
    if config.ckpt_path != "last":
        run = Path(config.ckpt_path).resolve().parent.parent
        if version is None and run.parent == base.resolve() and _version_number(run) is not None:
            init_args["version"] = _version_number(run)
        return
    if version is not None:
        runs = [base / (version if isinstance(version, str) else f"version_{version}")]
    else:
        runs = sorted((path for path in base.glob("version_*") if _version_number(path) is not None),
                      key=_version_number, reverse=True)
    for run in runs:
        checkpoint = run / "checkpoints" / "last.ckpt"
        if checkpoint.exists():
            init_args["version"] = run.name if isinstance(version, str) else _version_number(run)
            config["ckpt_path"] = str(checkpoint)
            return
    raise CheckpointNotFoundError(
        f"--ckpt_path last: no run to resume, {base}/{'version_*' if version is None else runs[0].name}"
        "/checkpoints/last.ckpt does not exist. Start the run without --ckpt_path."
    )


def _version_number(run: Path) -> int | None:
    """``N`` for a logger's ``version_N`` folder, ``None`` for any other name."""
    match = re.fullmatch(r"version_(\d+)", run.name)
    return int(match.group(1)) if match else None


class KeepConfigOnResume(SaveConfigCallback):
    """Writes ``config.yaml`` into a new run's folder; a resumed run keeps the one its run started with."""

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self.config.get("ckpt_path") is not None:
            self.already_saved = True
        super().setup(trainer, pl_module, stage)


def main(args: ArgsType = None) -> None:
    """Entry point of the ``saal`` console script and of ``python -m saal_lightning``; tests pass ``args``."""
    try:
        SAALCLI(
            ActiveClassifier,
            ActiveDataModule,
            subclass_mode_data=True,
            seed_everything_default=0,
            save_config_callback=KeepConfigOnResume,
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
            args=args,
        )
    except (DatasetNotFoundError, CheckpointNotFoundError, ResumeMismatchError, LabelImportError) as err:
        print(f"saal: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except TrainingDivergedError as err:
        print(f"saal: error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    except SIGTERMException:
        print("saal: stopped by SIGTERM. The last round checkpoint is kept: rerun the same command with "
              "--ckpt_path last to resume.", file=sys.stderr)
        raise SystemExit(SIGTERM_EXIT_STATUS) from None


if __name__ == "__main__":
    main()
