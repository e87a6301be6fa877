"""The ``saal`` command: LightningCLI with the acquisition callback under its own ``acquisition:`` key.

    saal fit --config configs/quickstart.yaml
    saal fit --config configs/fashion_mnist/saal_adam.yaml --acquisition.strategy entropy
    saal fit --config configs/quickstart.yaml --print_config
"""

from __future__ import annotations

import sys

from lightning.pytorch.cli import ArgsType, LightningCLI

from saal_lightning.callbacks.acquisition_callback import AcquisitionCallback
from saal_lightning.data.active_datamodule import ActiveDataModule
from saal_lightning.data.vision_datasets import DatasetNotFoundError
from saal_lightning.models.classifier import ActiveClassifier


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


def total_epochs(num_rounds: int, epochs_per_round: int) -> int:
    """Epochs of a whole experiment: the initial round plus ``num_rounds`` acquisition rounds."""
    return epochs_per_round * (num_rounds + 1)


def main(args: ArgsType = None) -> None:
    """Entry point of the ``saal`` console script and of ``python -m saal_lightning``; tests pass ``args``.

    A missing data set ends the run with its one-line explanation (how to get it) instead of a traceback.
    """
    try:
        SAALCLI(
            ActiveClassifier,
            ActiveDataModule,
            subclass_mode_data=True,
            seed_everything_default=0,
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
            args=args,
        )
    except DatasetNotFoundError as err:
        print(f"saal: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
