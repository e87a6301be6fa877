"""The README's drop-in snippet, run verbatim against a stand-in `my_project` (a user's module and data)."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from tests.synthetic_data import SyntheticImages

README = Path(__file__).resolve().parents[1] / "README.md"


class MyClassifier(pl.LightningModule):
    """What a user already has: automatic optimization, forward returns logits, no knowledge of SAAL."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                                 nn.Linear(8 * 8 * 8, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def drop_in_snippet(marker: str = "drop-in") -> str:
    text = README.read_text()
    match = re.search(rf"<!-- {marker}:[^>]*-->\s*```python\n(.*?)```", text, flags=re.DOTALL)
    assert match, f"README lost its {marker} block"
    return match.group(1)


def run_snippet(marker: str, monkeypatch, tmp_path) -> dict:
    my_project = types.ModuleType("my_project")
    my_project.MyClassifier = MyClassifier
    my_project.train_set = SyntheticImages(200, num_classes=4, seed=0)
    my_project.test_set = SyntheticImages(40, num_classes=4, seed=1)
    monkeypatch.setitem(sys.modules, "my_project", my_project)
    monkeypatch.chdir(tmp_path)  # the Trainer writes lightning_logs/ and the round records here
    namespace: dict = {}
    exec(compile(drop_in_snippet(marker), str(README), "exec"), namespace)
    return namespace


@pytest.mark.parametrize("marker", ["drop-in", "drop-in loop"])
def test_readme_snippets_are_short(marker: str) -> None:
    assert len(drop_in_snippet(marker).strip().splitlines()) < 15


def test_readme_drop_in_snippet_runs_verbatim(monkeypatch, tmp_path, capsys) -> None:
    namespace = run_snippet("drop-in", monkeypatch, tmp_path)
    assert namespace["datamodule"].num_labeled == 70
    assert capsys.readouterr().out.strip().splitlines()[-1] == "70"
    assert len(namespace["acquisition"].history) == 6
    assert (tmp_path / "lightning_logs" / "version_0" / "rounds.csv").exists()


def test_readme_loop_of_fits_runs_verbatim(monkeypatch, tmp_path, capsys) -> None:
    namespace = run_snippet("drop-in loop", monkeypatch, tmp_path)
    assert namespace["datamodule"].num_labeled == 20 + 3 * 10
    assert capsys.readouterr().out.strip().splitlines()[-1] == "50"
    history = namespace["acquisition"].history
    assert [row["round"] for row in history] == [0, 1, 2] and [row["num_labeled"] for row in history] == [20, 30, 40]
    assert namespace["trainer"].max_epochs == 3  # the callback left the user's epoch limit alone
    # Every round's record is in the first fit's folder, although each Trainer logged into a version of its own.
    rounds = (tmp_path / "lightning_logs" / "version_0" / "rounds.csv").read_text().splitlines()
    assert len(rounds) == 1 + 3
