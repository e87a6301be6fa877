"""What a newcomer meets on the command line: a --help that fits a terminal, one-line refusals, a quiet run."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from saal_lightning.acquisition.strategies import STRATEGIES
from saal_lightning.cli import explain_parse_error, main, plain_text
from saal_lightning.data import vision_datasets
from saal_lightning.lightning_noise import quiet_lightning_noise
from tests.synthetic_data import write_fashion

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")
# The messages that the quickstart and the drop-in printed before, none of which a user can act on.
NOISE = ("litlogger", "litmodels", "You defined a `validation_step` but have no `val_dataloader`", "LeafSpec",
         "`max_epochs` was not set")


def _help(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("COLUMNS", "80")  # argparse wraps to the terminal's width
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_help_fits_a_screen_or_two_per_section(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    text = _help(capsys, monkeypatch)
    lines = text.splitlines()
    assert len(lines) < 330  # 1,270 before, 673 of them the nn.Module subclasses of --model.backbone's help
    sections = re.split(r"\n(?=\S[^\n]*:\n)", text)  # a section starts with an unindented "title:" line
    sizes = {section.splitlines()[0]: len(section.splitlines()) for section in sections}
    assert max(sizes.values()) < 160, sizes  # the Trainer's, 41 options; ours are far shorter
    model = next(section for section in sections if section.startswith("Image classifier"))
    assert len(model.splitlines()) < 40 and "torch.nn" not in text and "known subclasses: Module" not in text
    assert "--model.backbone BACKBONE" in model and "small_cnn" in model and "wide_cnn" in model
    # No raw Sphinx/reST markup anywhere, Lightning's own help texts included.
    assert "``" not in text and not re.search(r":(class|func|mod|meth|paramref):`", text)


def test_help_lists_every_strategy_name_with_its_summary(capsys: pytest.CaptureFixture,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    text = _help(capsys, monkeypatch)
    for name in STRATEGIES:
        assert re.search(rf"^ +{name} +[A-Z]", text, flags=re.MULTILINE), name
    assert "Label the items whose predictive distribution has the highest entropy" in " ".join(text.split())


@pytest.mark.parametrize(("args", "message"), [
    (["--acquisition.strategy", "entropi"],
     "acquisition.strategy: unknown strategy 'entropi' (did you mean 'entropy'?); the strategies are random, "
     "entropy, margin, least_confidence, coreset, badge, ll4al, vaal, saal, saal_diverse, or a class_path"),
    (["--acquisition.strategy", "gibberish"], "unknown strategy 'gibberish'; the strategies are random,"),
    (["--acquisition.strategy.init_args.rho", "-1"], "acquisition.strategy (SAAL): rho must be"),
    (["--acquisition.strategy.init_args.rh", "1"],
     "unknown option acquisition.strategy.init_args.rh of SAAL (did you mean 'rho'?)"),
    (["--model.rho", "-1"], "model.rho must be a finite number > 0, got -1.0"),
    (["--model.lr", "0"], "model.lr must be a finite number > 0, got 0.0"),
    (["--model.optimizer", "adamw"], "model.optimizer must be one of 'adam', 'sgd', 'sam', got 'adamw' "
                                     "(did you mean 'adam'?)"),
    (["--model.backbone", "smal_cnn"], "model.backbone must be one of 'resnet18', 'small_cnn', 'wide_cnn' or an "
                                       "nn.Module, got 'smal_cnn' (did you mean 'small_cnn'?)"),
    (["--trainer.max_epoch", "5"],
     "unknown option --trainer.max_epoch (did you mean '--trainer.max_epochs'?); `saal fit --help` lists the "
     "options"),
    (["--trainer.max_epochs", "5"],
     "trainer.max_epochs is set from the acquisition schedule, epochs_per_round x (num_rounds + 1) = 20 x (10 + 1) "
     "= 220: set acquisition.num_rounds and acquisition.epochs_per_round instead"),
], ids=lambda value: value[0] if isinstance(value, list) else None)
def test_a_mistake_is_one_line_at_parse_time(args: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    # --print_config prints before jsonargparse validates: the refusal must come before it.
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", QUICKSTART, *args, "--print_config"])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [captured.err.strip()], captured.err  # one line
    assert captured.err.startswith("saal: error: ") and message in captured.err


def test_a_mistake_in_a_config_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for text, message in [("trainer:\n  max_epoch: 5\n", "unknown option trainer.max_epoch (did you mean "
                                                         "'trainer.max_epochs'?)"),
                          ("trainer:\n  max_epochs: 5\n", "trainer.max_epochs is set from the acquisition schedule"),
                          ("acquisition:\n  strategy: margn\n", "unknown strategy 'margn' (did you mean 'margin'?)")]:
        config = tmp_path / "mistake.yaml"
        config.write_text(text)
        for extra in ([], ["--print_config"]):
            with pytest.raises(SystemExit) as exit_info:
                main(["fit", "--config", QUICKSTART, "--config", str(config), *extra])
            assert exit_info.value.code == 2
            error = capsys.readouterr().err
            assert error.startswith("saal: error: ") and message in error and error.count("\n") == 1, error


def test_max_epochs_equal_to_the_schedule_is_accepted(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", QUICKSTART, "--trainer.max_epochs", "220", "--print_config"])
    assert exit_info.value.code == 0


def test_the_command_refuses_an_unknown_strategy_in_one_line() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "saal_lightning", "fit", "--config", QUICKSTART, "--acquisition.strategy", "entropi"],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "saal: error: acquisition.strategy: unknown strategy 'entropi' (did you mean 'entropy'?); the strategies are "
        "random, entropy, margin, least_confidence, coreset, badge, ll4al, vaal, saal, saal_diverse, or a class_path"
    ]


def test_the_quickstart_prints_no_warning_a_user_cannot_act_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    debian = tmp_path / "debian-fashion-mnist"
    write_fashion(debian, compressed=True, train_count=60, test_count=20)
    monkeypatch.setattr(vision_datasets, "DEBIAN_FASHION_MNIST_DIR", debian)
    caplog.set_level(logging.INFO)  # Lightning's info lines, as its own handler prints them
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # every warning, also those that pytest's configuration ignores
        main(["fit", "--config", QUICKSTART, "--data.init_args.root", str(tmp_path / "data"),
              "--data.init_args.batch_size", "8", "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
              "--acquisition.num_rounds", "1", "--acquisition.epochs_per_round", "1",
              "--acquisition.query_size", "5", "--acquisition.pool_size", "15"])
    shown = [w for w in caught if not issubclass(w.category, DeprecationWarning)]  # hidden by Python's defaults
    assert shown == [], [f"{w.category.__name__}: {w.message}" for w in shown]
    assert any("GPU available" in message for message in caplog.messages)  # the log lines are captured
    printed = "\n".join([*caplog.messages, capsys.readouterr().err])
    assert not [noise for noise in NOISE if noise in printed], printed


def test_the_drop_in_trains_without_the_max_epochs_warning(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from tests.test_readme import run_snippet

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_snippet("drop-in", monkeypatch, tmp_path)
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "`max_epochs` was not set" in m or "validation_step" in m], messages


def test_quiet_lightning_noise_drops_only_its_two_messages(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_lightning_noise()
        quiet_lightning_noise()  # twice adds nothing
        for module in ("lightning.pytorch.utilities._pytree", "my_project"):
            warnings.warn_explicit("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning,
                                   f"{module}.py", 1, module=module)
        warnings.warn_explicit("You defined a `validation_step` but have no `val_dataloader`.", UserWarning,
                               "validator.py", 1, module="lightning.pytorch.trainer.configuration_validator")
    logger.info("💡 Tip: For seamless cloud logging and experiment tracking, try installing litlogger")
    logger.info("GPU available: False, used: False")
    assert [(w.category, w.filename) for w in caught] == [(FutureWarning, "my_project.py"),
                                                          (UserWarning, "validator.py")]
    assert caplog.messages == ["GPU available: False, used: False"]
    assert sum(type(f).__name__ == "_DropAdvertisements" for f in logger.filters) == 1


def test_plain_text_renders_sphinx_markup() -> None:
    assert plain_text("an ``nn.Module`` or :class:`~saal_lightning.AcquisitionStrategy` (:func:`entropy_scores`)"
                      ", see `the notes <https://x.org/a>`_ and :class:`torch.optim.SGD`, set `-1`") == (
        "an nn.Module or AcquisitionStrategy, see the notes (https://x.org/a) and torch.optim.SGD, set -1")


def test_explain_parse_error_leaves_other_messages_alone() -> None:
    message = 'Parser key "data": something else'
    assert explain_parse_error(message, parser=None) == message
