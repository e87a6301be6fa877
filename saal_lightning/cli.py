"""The ``saal`` command: LightningCLI with the acquisition callback under its own ``acquisition:`` key.

    saal fit --config configs/quickstart.yaml
    saal fit --config configs/quickstart.yaml --ckpt_path last      # resume the latest run of that config
    saal fit --config configs/fashion_mnist/saal_adam.yaml --acquisition.strategy entropy
    saal fit --config configs/quickstart.yaml --print_config

``saal fit`` runs the whole experiment in one fit (rounds of ``acquisition.epochs_per_round`` epochs), so a
checkpoint resumes it anywhere. What this module adds to LightningCLI:

* ``trainer.max_epochs`` is set from the acquisition schedule, ``epochs_per_round * (num_rounds + 1)``.
* ``--ckpt_path last`` finds the newest ``version_N`` of the config's logger that holds
  ``checkpoints/last.ckpt``, and logs the resumed run into that same folder (Lightning alone would look in a new,
  empty ``version_N + 1`` and start from scratch). A resumed run keeps the ``config.yaml`` it started with.
* ``seed_everything`` seeds the data module's and the acquisition callback's seeds when they are left unset, and
  the saved ``config.yaml`` shows the values in use.
* A mistake in the command line or the config is one line on stderr (exit status 2), found before anything is
  built, ``--print_config`` included: an unknown option or strategy (with "did you mean" for a close name), an
  option out of its range (``rho: -1``), ``trainer.max_epochs`` set by hand.
* A refused resume, answers that cannot be imported, a missing data set or a diverged training ends with one
  line on stderr (exit status 2, or 1 for divergence) instead of a traceback; SIGTERM stops the run with exit
  status 143, resumable with ``--ckpt_path last``.
* ``--help`` fits a terminal: no list of every ``nn.Module`` (or callback) class, one line per strategy name, no
  Sphinx markup.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
import textwrap
import warnings
from argparse import Action
from pathlib import Path
from typing import Any, NoReturn

from jsonargparse import DefaultHelpFormatter, Namespace
from lightning.pytorch import Trainer
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI, SaveConfigCallback, instantiate_class
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.warnings import PossibleUserWarning

from saal_lightning.acquisition.strategies import STRATEGIES
from saal_lightning.callbacks.acquisition_callback import AcquisitionCallback
from saal_lightning.callbacks.resume_checks import ResumeMismatchError
from saal_lightning.callbacks.training_health import TrainingDivergedError
from saal_lightning.data.active_datamodule import ActiveDataModule
from saal_lightning.data.vision_datasets import DatasetNotFoundError
from saal_lightning.labeling.query_files import LabelImportError
from saal_lightning.lightning_noise import quiet_lightning_noise
from saal_lightning.models.classifier import ActiveClassifier, check_classifier_options
from saal_lightning.option_checks import did_you_mean

# The exit status of a process ended by SIGTERM, by shell convention (128 + 15).
SIGTERM_EXIT_STATUS = 143
# The usage line of `saal fit --help` (and of the other subcommands): argparse's lists every option, 60 lines.
SUBCOMMAND_USAGE = "%(prog)s [-h] [-c CONFIG] [--print_config[=flags]] [--SECTION.OPTION VALUE ...]"
# The help of Trainer.fit's arguments, for saal (Lightning's ckpt_path help is 30 lines about its model registry).
FIT_ARGUMENT_HELP = {
    "ckpt_path": "the checkpoint to resume from: a path, or last for the newest version_N/checkpoints/last.ckpt "
                 "of this config's logger (the resumed run logs into that same folder).",
    "weights_only": "load the checkpoint with torch.load(weights_only=...); null: Lightning's choice.",
}
# A list of known subclasses longer than this is left out of --help (nn.Module's has hundreds of entries);
# `--KEY.help CLASS` shows the options of any class.
MAX_LISTED_SUBCLASSES = 8
# Where the help text starts, under the option (the options' names are too long for a column beside them).
HELP_INDENT = 8


class CheckpointNotFoundError(FileNotFoundError):
    """``--ckpt_path last`` found no run of this config to resume."""


class OptionError(ValueError):
    """An option that ``saal`` refuses before it builds anything: one line on stderr, exit status 2."""


class SAALHelpFormatter(DefaultHelpFormatter):
    """jsonargparse's help, made for a terminal.

    Each option's help goes under it, indented by ``HELP_INDENT``; known subclasses are listed by class name, and
    not at all when there are more than ``MAX_LISTED_SUBCLASSES``; Sphinx markup is rendered as plain text; a help
    line that starts with two spaces (the list of strategy names) keeps a line of its own.
    """

    def __init__(self, prog: str, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("max_help_position", HELP_INDENT)
        super().__init__(prog, *args, **kwargs)

    def _get_help_string(self, action: Action) -> str:
        help_string = super()._get_help_string(action)
        listed = re.search(r", known subclasses: ([^()]*)\)$", help_string)
        if listed:
            names = [path.strip().rsplit(".", 1)[-1] for path in listed.group(1).split(",")]
            shown = f", known subclasses: {', '.join(names)}" if len(names) <= MAX_LISTED_SUBCLASSES else ""
            help_string = help_string[: listed.start()] + shown + ")"
        return plain_text(help_string.removesuffix(" ()"))

    def start_section(self, heading: str | None) -> None:
        super().start_section(plain_text(heading) if heading else heading)

    def _format_text(self, text: str) -> str:
        return super()._format_text(plain_text(text))

    def _split_lines(self, text: str, width: int) -> list[str]:
        lines: list[str] = []
        paragraph: list[str] = []
        for line in text.splitlines():
            if not line.startswith("  "):
                paragraph.append(line)
                continue
            if paragraph:
                lines += super()._split_lines(" ".join(paragraph), width)
                paragraph = []
            hanging = re.match(r"\s+\S+\s+", line)
            indent = " " * (hanging.end() if hanging else 2)
            lines += textwrap.wrap(line, width, subsequent_indent=indent)
        if paragraph:
            lines += super()._split_lines(" ".join(paragraph), width)
        return lines


def plain_text(text: str) -> str:
    """Sphinx/reST markup as plain text: ``x`` and `x` -> x, :class:`~a.B` -> B, `text <url>`_ -> text (url)."""
    text = re.sub(r"\s*\(:[a-z]+(?::[a-z]+)?:`[^`]*`\)", "", text)  # "(:func:`entropy_scores`)": a cross-reference
    text = re.sub(r"`([^`<]+?)\s*<([^>]+)>`_+", r"\1 (\2)", text)

    def role(match: re.Match[str]) -> str:
        target = match.group(2)
        return target.rsplit(".", 1)[-1] if match.group(1) else target

    text = re.sub(r":[a-z]+(?::[a-z]+)?:`(~?)([^`]+)`", role, text)
    return re.sub(r"``?([^`]+?)``?", r"\1", text)


def first_sentence(text: str) -> str:
    """The first sentence of ``text``, on one line."""
    return re.split(r"(?<=[.!?])\s+(?=[A-Z(`])", " ".join(text.split()), maxsplit=1)[0]


def strategy_help() -> str:
    """The help of ``--acquisition.strategy``: what it takes, then every registered name and its summary."""
    width = max(len(name) for name in STRATEGIES)
    names = [f"  {name:<{width}}  {_summary(strategy)}" for name, strategy in STRATEGIES.items()]
    return "\n".join([
        "the acquisition strategy: a name below, with its default options, or class_path + init_args for its "
        "options (e.g. {class_path: SAAL, init_args: {rho: 0.05, adaptive: true}}) or for your own "
        "AcquisitionStrategy subclass (type: %(type)s, default: %(default)s):",
        *names,
    ])


def _summary(component: object) -> str:
    """The first paragraph of a docstring, on one line."""
    return " ".join((inspect.getdoc(component) or "").split("\n\n")[0].split())


class SAALArgumentParser(LightningArgumentParser):
    """LightningCLI's parser with :class:`SAALHelpFormatter`, one-line errors, no abbreviated options, and a check of
    the whole config before ``--print_config``.

    jsonargparse builds the parsers of ``--KEY.help CLASS`` as instances of this class too, so they share the help.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", SAALHelpFormatter)
        kwargs.setdefault("allow_abbrev", False)  # --trainer.max_epoch is a typo, not --trainer.max_epochs
        super().__init__(*args, **kwargs)

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:  # a nested parse that jsonargparse catches
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        print(f"saal: error: {explain_parse_error(message, parser)}", file=sys.stderr)
        self.exit(2)

    def add_method_arguments(self, *args: Any, **kwargs: Any) -> list[str]:
        # The arguments of Trainer.fit (ckpt_path, weights_only), added after add_arguments_to_parser.
        added = super().add_method_arguments(*args, **kwargs)
        for action in self._actions:
            if action.dest in FIT_ARGUMENT_HELP:
                action.help = FIT_ARGUMENT_HELP[action.dest]
        return added

    def dump(self, *args: Any, **kwargs: Any) -> str:
        # jsonargparse prints --print_config before it validates, and without the links applied: checking here
        # refuses to print a config that saal would refuse to run.
        config = args[0] if args else kwargs.get("namespace", kwargs.get("cfg"))
        if isinstance(config, Namespace):
            check_config(config)
        return super().dump(*args, **kwargs)


def explain_parse_error(message: str, parser: Any) -> str:
    """jsonargparse's message, on one line with "did you mean" where it names an unknown option or choice."""
    unknown = re.match(r"unrecognized arguments: (\S+)", message)
    if unknown:
        option = unknown.group(1).split("=", 1)[0]
        options = [string for action in _all_actions(parser) for string in action.option_strings]
        return (f"unknown option {option}{did_you_mean(option, options)}; "
                f"`{parser.prog.replace(' [options]', '')} --help` lists the options")
    unknown_key = re.match(r"(Group|Subcommand) '([\w.]+)' does not accept option '([\w.]+)'", message)
    if unknown_key:
        key = unknown_key.group(3) if unknown_key.group(1) == "Subcommand" else ".".join(unknown_key.group(2, 3))
        return f"unknown option {key}{did_you_mean(key, [action.dest for action in _all_actions(parser)])}"
    unknown_init_arg = re.search(r"Parser key \"([\w.]+)\":.*?class_path '([\w.]+)':\s+Option '(\w+)' is not "
                                 "accepted", message, flags=re.DOTALL)
    if unknown_init_arg:
        key, class_path, name = unknown_init_arg.groups()
        return (f"unknown option {key}.init_args.{name} of {class_path.rsplit('.', 1)[-1]}"
                f"{did_you_mean(name, _init_parameters(class_path))}")
    choice = re.search(r'Parser key "([\w.]+)":\s+Expected a (typing\.)?Literal\[(.*?)\]\. Got value: (\S+)', message)
    if choice:
        choices = re.findall(r"'([^']*)'", choice.group(3))
        return (f"{choice.group(1)} must be one of {', '.join(repr(c) for c in choices)}, got {choice.group(4)!r}"
                f"{did_you_mean(choice.group(4), choices)}")
    return message


def _all_actions(parser: Any) -> list[Action]:
    """The actions of ``parser`` and of its subcommands' parsers (argparse's ``_actions``, subparsers' ``choices``)."""
    actions = list(parser._actions)
    for action in parser._actions:
        if isinstance(getattr(action, "choices", None), dict):
            for subparser in action.choices.values():
                if hasattr(subparser, "_actions"):
                    actions += _all_actions(subparser)
    return actions


def _init_parameters(class_path: str) -> list[str]:
    """The parameter names of a class's ``__init__``, ``[]`` when it cannot be imported."""
    module, _, name = class_path.rpartition(".")
    try:
        return list(inspect.signature(getattr(importlib.import_module(module), name)).parameters)
    except (ImportError, AttributeError, ValueError, TypeError):
        return []


def check_config(config: Namespace) -> None:
    """Refuse what ``saal`` could not run, before anything is built.

    Raises:
        OptionError: naming the option, for an unknown strategy name, a strategy or model option out of its
            range, a missing ``acquisition.epochs_per_round`` or a ``trainer.max_epochs`` that the schedule does
            not give.
    """
    subcommand = config.get("subcommand")
    if subcommand is not None and isinstance(config.get(subcommand), Namespace):
        config = config[subcommand]
    acquisition = config.get("acquisition")
    if not isinstance(acquisition, Namespace):
        return
    check_strategy(acquisition.get("strategy"))
    model = config.get("model")
    if isinstance(model, Namespace):
        try:
            check_classifier_options(model.as_dict())
        except ValueError as err:
            raise OptionError(f"model.{err}") from None
    epochs_per_round, num_rounds = acquisition.get("epochs_per_round"), acquisition.get("num_rounds")
    if epochs_per_round is None:
        raise OptionError("saal fit runs every round inside one fit: set acquisition.epochs_per_round (the epochs "
                          "of one round, e.g. 20)")
    max_epochs = config.get("trainer", Namespace()).get("max_epochs")
    total = epochs_per_round * (num_rounds + 1)
    if max_epochs is not None and max_epochs != total:
        raise OptionError(
            f"trainer.max_epochs is set from the acquisition schedule, epochs_per_round x (num_rounds + 1) = "
            f"{epochs_per_round} x ({num_rounds} + 1) = {total}: set acquisition.num_rounds and "
            "acquisition.epochs_per_round instead"
        )


def check_strategy(strategy: Any) -> None:
    """Refuse an unknown strategy name, or a strategy whose options its class refuses (it is built to check)."""
    if isinstance(strategy, str):
        if strategy not in STRATEGIES:
            raise OptionError(f"acquisition.strategy: unknown strategy {strategy!r}{did_you_mean(strategy, STRATEGIES)}"
                              f"; the strategies are {', '.join(STRATEGIES)}, or a class_path")
        return
    if isinstance(strategy, Namespace) and isinstance(strategy.get("class_path"), str):
        init_args = strategy.get("init_args")
        try:
            instantiate_class((), {"class_path": strategy.class_path,
                                   "init_args": init_args.as_dict() if isinstance(init_args, Namespace) else {}})
        except ValueError as err:
            raise OptionError(f"acquisition.strategy ({strategy.class_path.rsplit('.', 1)[-1]}): {err}") from None


class SAALCLI(LightningCLI):
    """LightningCLI that forces an :class:`AcquisitionCallback`, links data properties into the model and checks
    the config before it builds anything; :func:`main` gives it :class:`SAALArgumentParser`."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # A forced callback with its own key (not an entry of trainer.callbacks), so that its values can be
        # linked and overridden as --acquisition.query_size 10.
        parser.add_lightning_class_args(AcquisitionCallback, "acquisition")
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.in_channels", "model.in_channels", apply_on="instantiate")
        # Rounds change the labeled set between epochs: the training loader must be rebuilt every epoch.
        parser.set_defaults({"trainer.reload_dataloaders_every_n_epochs": 1})
        # Lightning's Trainer documents every option at length (350 lines of --help): its first sentence here,
        # the rest in Lightning's documentation.
        for action in parser._actions:
            if action.dest.startswith("trainer.") and action.help:
                action.help = first_sentence(action.help)
        _set_help(parser, "trainer.max_epochs", "Set by saal from the acquisition schedule: "
                  "acquisition.epochs_per_round x (acquisition.num_rounds + 1); leave it unset.")
        _set_help(parser, "acquisition.strategy", strategy_help())
        _set_help(parser, "acquisition.epochs_per_round", "the epochs of one round (saal fit needs it: it runs every "
                  "round inside one fit, epochs_per_round x (num_rounds + 1) epochs, and rebuilds the training "
                  "loader every epoch).")
        _set_help(parser, "seed_everything", "seed of everything before anything is built; it also seeds "
                  "data.init_args.seed and acquisition.seed when they are unset. true: a random seed (written to "
                  "config.yaml).")

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        super().parse_arguments(parser, args)
        check_config(self.config)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        seed_unset_seeds(config)
        if self.subcommand == "fit" and config.get("ckpt_path") is not None:
            resolve_resumed_run(config)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ValueError as err:  # a constructor refused an option
            raise OptionError(str(err)) from err
        datamodule = self.datamodule
        if isinstance(datamodule, ActiveDataModule) and datamodule.val_dataset is None:
            # Validation is optional: without a validation set there is none, as intended (this filter lasts
            # until main() returns).
            warnings.filterwarnings("ignore", message="You defined a `validation_step` but have no `val_dataloader`",
                                    category=PossibleUserWarning)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        # The experiment's length is a property of the acquisition schedule: round 0 plus num_rounds rounds.
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        kwargs.setdefault("max_epochs", config["acquisition"].total_epochs)
        return super().instantiate_trainer(**kwargs)


def _set_help(parser: LightningArgumentParser, dest: str, text: str) -> None:
    """Replace the help of the option ``dest`` (argparse keeps the parser's actions in ``_actions``)."""
    action = next(action for action in parser._actions if action.dest == dest)
    action.help = text


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
                      key=lambda path: _version_number(path) or 0, reverse=True)
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
    quiet_lightning_noise()
    subcommand_kwargs = {"usage": SUBCOMMAND_USAGE}
    try:
        with warnings.catch_warnings():  # the filters that SAALCLI adds end with the run
            SAALCLI(
                ActiveClassifier,
                ActiveDataModule,
                subclass_mode_data=True,
                seed_everything_default=0,
                save_config_callback=KeepConfigOnResume,
                save_config_kwargs={"overwrite": True},
                parser_class=SAALArgumentParser,
                parser_kwargs={"prog": "saal", **{name: dict(subcommand_kwargs) for name in SAALCLI.subcommands()}},
                auto_configure_optimizers=False,
                args=args,
            )
    except (OptionError, DatasetNotFoundError, CheckpointNotFoundError, ResumeMismatchError, LabelImportError) as err:
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
