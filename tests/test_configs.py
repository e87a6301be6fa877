"""Every shipped config parses through the real CLI, and the generated paper configs are up to date."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from saal_lightning.cli import main

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "configs"))
import generate  # noqa: E402  (configs/generate.py, the config generator)

CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


def test_generated_configs_are_up_to_date() -> None:
    assert generate.main(["--check"]) == 0, "run `python configs/generate.py`"
    assert len(generate.render_all()) == 4 * 10 * 2


@pytest.mark.parametrize("config", [c for c in CONFIGS if c.parent.name in ("fashion_mnist", "cifar100")] +
                         [REPO / "configs" / "quickstart.yaml"], ids=lambda p: f"{p.parent.name}/{p.name}")
def test_config_parses_and_validates(config: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["reload_dataloaders_every_n_epochs"] == 1
    assert printed["acquisition"]["query_size"] >= 10


def test_paper_protocol_values() -> None:
    adam = yaml.safe_load((REPO / "configs" / "fashion_mnist" / "saal_diverse_adam.yaml").read_text())
    assert adam["model"] == {"backbone": "resnet18", "optimizer": "adam", "lr": 0.001}
    assert adam["data"]["init_args"]["initial_labels"] == 20 and adam["data"]["init_args"]["batch_size"] == 10
    acquisition = adam["acquisition"]
    assert (acquisition["query_size"], acquisition["pool_size"], acquisition["num_rounds"],
            acquisition["epochs_per_round"], acquisition["reset_weights"]) == (10, 2000, 100, 50, True)
    assert acquisition["strategy"]["class_path"].endswith("SAALDiverse")
    assert acquisition["strategy"]["init_args"]["adaptive"] is True
    sam = yaml.safe_load((REPO / "configs" / "cifar100" / "saal_diverse_sam.yaml").read_text())
    assert sam["model"]["optimizer"] == "sam" and sam["model"]["momentum"] == 0.9 and sam["model"]["rho"] == 0.05
    assert sam["acquisition"]["reset_weights"] is False
    assert (sam["acquisition"]["query_size"], sam["acquisition"]["pool_size"]) == (100, 10000)
    assert sam["data"]["init_args"]["initial_labels"] == 1000


def test_config_file_names_are_strategy_names() -> None:
    """`saal` is top-k SAAL everywhere (strategy registry, config files, tables); `saal_diverse` adds diversity."""
    from saal_lightning.acquisition.strategies import STRATEGIES

    generated = [config for config in CONFIGS if config.parent != REPO / "configs"]
    assert len(generated) == 80
    for config in generated:
        strategy = yaml.safe_load(config.read_text())["acquisition"]["strategy"]
        name = config.stem.rsplit("_", 1)[0]
        if isinstance(strategy, str):
            assert strategy == name
        else:
            assert STRATEGIES[name].__name__ == strategy["class_path"].rsplit(".", 1)[1]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_config_checkpoints_every_round_end_and_follows_one_seed(config: Path) -> None:
    loaded = yaml.safe_load(config.read_text())
    callbacks = loaded["trainer"]["callbacks"]
    checkpoints = [c["init_args"] for c in callbacks if c["class_path"].endswith("ModelCheckpoint")]
    assert len(checkpoints) == 1
    checkpoint, epochs_per_round = checkpoints[0], loaded["acquisition"]["epochs_per_round"]
    # save_top_k 0 would write last.ckpt only when training ends: a kill before that would lose the whole run.
    assert checkpoint["save_top_k"] != 0 and checkpoint["save_last"] in (True, "link")
    assert checkpoint["save_on_train_epoch_end"] is True and epochs_per_round % checkpoint["every_n_epochs"] == 0
    assert "monitor" not in checkpoint  # a monitored checkpoint would rank rounds against each other
    # The run's folder is resumable: the logger appends to metrics.csv instead of deleting it.
    assert loaded["trainer"]["logger"]["class_path"].endswith("AppendingCSVLogger")
    # No explicit seeds: seed_everything seeds the data split and the acquisition.
    assert "seed" not in loaded["data"]["init_args"] and "seed" not in loaded["acquisition"]
