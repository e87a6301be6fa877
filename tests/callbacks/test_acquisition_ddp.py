"""Two CPU processes (gloo, ddp_spawn): the pool is scored in shards, gathered, and every rank labels the same
items."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from saal_lightning import AcquisitionCallback, ActiveClassifier, ActiveDataModule
from saal_lightning.acquisition.strategies import Entropy
from tests.synthetic_data import SyntheticImages


class ShardCheckingEntropy(Entropy):
    """Entropy that also writes, per rank and round, how many items this rank scored and what was gathered."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.round = 0
        self.scored = 0

    def compute(self, model, inputs):
        self.scored += len(inputs)
        return super().compute(model, inputs)

    def select(self, pool_outputs, query_size, generator, labeled_outputs=None):
        # Only rank 0 selects: keep what it saw for the test to check.
        torch.save(pool_outputs, Path(self.out_dir, f"gathered-round{self.round}.pt"))
        return super().select(pool_outputs, query_size, generator, labeled_outputs)

    def __repr__(self):
        return "ShardCheckingEntropy()"


class RecordPerRank(Callback):
    """After each acquisition, every rank writes its labeled set and how many pool items it scored."""

    def __init__(self, out_dir: str, strategy: ShardCheckingEntropy) -> None:
        self.out_dir, self.strategy = out_dir, strategy

    def on_train_epoch_end(self, trainer, pl_module):
        dm = trainer.datamodule
        record = {"labeled": dm.labeled_indices.tolist(), "scored": self.strategy.scored}
        path = Path(self.out_dir, f"rank{trainer.global_rank}-epoch{trainer.current_epoch}.json")
        path.write_text(json.dumps(record))
        self.strategy.round += 1
        self.strategy.scored = 0


@pytest.mark.skipif(sys.platform == "win32", reason="ddp_spawn with gloo on CPU")
def test_two_process_acquisition_agrees_across_ranks(tmp_path: Path) -> None:
    datamodule = ActiveDataModule(train_dataset=SyntheticImages(120, seed=0), test_dataset=SyntheticImages(40, seed=1),
                                  initial_labels=8, batch_size=8, eval_batch_size=16)
    strategy = ShardCheckingEntropy(str(tmp_path))
    acquisition = AcquisitionCallback(strategy, query_size=5, pool_size=31, num_rounds=2, epochs_per_round=1,
                                      output_dir=str(tmp_path), plot=False)
    trainer = pl.Trainer(accelerator="cpu", strategy="ddp_spawn", devices=2, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         reload_dataloaders_every_n_epochs=1,
                         callbacks=[acquisition, RecordPerRank(str(tmp_path), strategy)])
    # SAM training, so that its ascent pass (no gradient sync) runs under DDP too.
    model = ActiveClassifier("small_cnn", num_classes=4, in_channels=1, optimizer="sam", lr=1e-2)
    trainer.fit(model, datamodule=datamodule)

    for epoch in range(2):
        ranks = [json.loads((tmp_path / f"rank{r}-epoch{epoch}.json").read_text()) for r in range(2)]
        assert ranks[0]["labeled"] == ranks[1]["labeled"]  # the broadcast selection, labeled everywhere
        assert len(ranks[0]["labeled"]) == 8 + 5 * (epoch + 1)
        assert sorted(r["scored"] for r in ranks) == [15, 16]  # 31 pool items split 16 / 15, no duplicates
        gathered = torch.load(tmp_path / f"gathered-round{epoch}.pt")
        assert gathered.shape == (31,) and torch.isfinite(gathered).all()
    record = json.loads((tmp_path / "labeled_indices.json").read_text())
    assert record["num_labeled"] == 18 and record["completed_rounds"] == 3


def test_a_pool_smaller_than_the_number_of_ranks_is_refused() -> None:
    from types import SimpleNamespace

    from saal_lightning.callbacks.pool_scoring import score_items, shard_positions

    assert shard_positions(5, 1, 2).tolist() == [1, 3]
    trainer = SimpleNamespace(world_size=4, global_rank=0)
    with pytest.raises(ValueError, match="cannot split 3 items across 4 ranks"):
        score_items(trainer, Entropy(), torch.nn.Identity(), None, torch.arange(3), torch.device("cpu"), print)


class WriteLabeledSet(Callback):
    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def on_train_end(self, trainer, pl_module):
        path = Path(self.out_dir, f"final-rank{trainer.global_rank}.json")
        path.write_text(json.dumps(trainer.datamodule.labeled_indices.tolist()))


@pytest.mark.skipif(sys.platform == "win32", reason="ddp_spawn with gloo on CPU")
@pytest.mark.parametrize("strategy", ["saal", "badge"])  # 1-D scores; 2-D packed gradient embeddings
def test_acquisition_under_ddp_labels_the_same_items_on_every_rank(tmp_path: Path, strategy: str) -> None:
    datamodule = ActiveDataModule(train_dataset=SyntheticImages(100, seed=0), test_dataset=SyntheticImages(20, seed=1),
                                  initial_labels=8, batch_size=8, eval_batch_size=16)
    acquisition = AcquisitionCallback(strategy, query_size=6, pool_size=25, num_rounds=2, epochs_per_round=1,
                                      output_dir=str(tmp_path), plot=False)
    trainer = pl.Trainer(accelerator="cpu", strategy="ddp_spawn", devices=2, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         reload_dataloaders_every_n_epochs=1, callbacks=[acquisition, WriteLabeledSet(str(tmp_path))])
    trainer.fit(ActiveClassifier("small_cnn", num_classes=4, in_channels=1), datamodule=datamodule)
    final = [json.loads((tmp_path / f"final-rank{rank}.json").read_text()) for rank in range(2)]
    assert final[0] == final[1] and len(set(final[0])) == 8 + 2 * 6
    assert json.loads((tmp_path / "labeled_indices.json").read_text())["labeled_indices"] == final[0]


def test_the_process_group_is_destroyed_once_at_exit(tmp_path: Path) -> None:
    """A gloo group left alive at exit aborts torch 2.14 (SIGABRT) in some runs; the callback's hook destroys it."""
    import subprocess
    import textwrap

    script = textwrap.dedent(f"""
        import atexit
        import torch.distributed as dist
        from saal_lightning.callbacks import pool_scoring

        calls = []
        def destroy():
            calls.append(dist.is_initialized())
            dist.destroy_process_group()
        pool_scoring.destroy_process_group = destroy

        pool_scoring.destroy_process_group_at_exit()  # no group yet: nothing to register
        dist.init_process_group("gloo", init_method="file://{tmp_path / 'store'}", rank=0, world_size=1)
        pool_scoring.destroy_process_group_at_exit()
        pool_scoring.destroy_process_group_at_exit()  # a second fit in the same process must not register it twice
        atexit._run_exitfuncs()
        print(calls, dist.is_initialized())
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[True] False"  # destroyed exactly once, while it was alive


@pytest.mark.parametrize("world_size", [2, 3])
def test_gather_in_order_puts_2d_outputs_back_in_position_order(world_size: int) -> None:
    """Rows of every rank's shard (BADGE's packed embeddings are 2-D) come back at their original positions."""
    from types import SimpleNamespace

    from saal_lightning.callbacks.pool_scoring import gather_in_order, shard_positions

    outputs = torch.arange(7 * 3, dtype=torch.float32).view(7, 3)  # row i is what position i's item scores
    shards = [outputs[shard_positions(7, rank, world_size)] for rank in range(world_size)]
    padded = []  # what each rank hands to all_gather (padded to equal length)
    def record(t: torch.Tensor) -> torch.Tensor:
        padded.append(t)
        return t.expand(world_size, *t.shape)  # any stack of the right shape: this pass only records

    recorder = SimpleNamespace(world_size=world_size, strategy=SimpleNamespace(all_gather=record))
    for shard in shards:
        gather_in_order(recorder, shard, 7)
    trainer = SimpleNamespace(world_size=world_size, strategy=SimpleNamespace(all_gather=lambda t: torch.stack(padded)))
    assert torch.equal(gather_in_order(trainer, shards[0], 7), outputs)


def test_each_rank_loads_only_its_shard_of_the_test_set() -> None:
    from types import SimpleNamespace

    from torch.utils.data import DataLoader
    from torchmetrics.classification import MulticlassAccuracy

    from saal_lightning.callbacks.acquisition_round import held_out_accuracy

    class RecordingImages(SyntheticImages):
        def __init__(self) -> None:
            super().__init__(11, seed=1)
            self.loaded: list[int] = []

        def __getitem__(self, index):
            self.loaded.append(index)
            return super().__getitem__(index)

    test_set = RecordingImages()
    datamodule = SimpleNamespace(test_dataloader=lambda: DataLoader(test_set, batch_size=4))
    model = ActiveClassifier("small_cnn", num_classes=4, in_channels=1)
    trainer = SimpleNamespace(global_rank=1, world_size=3, received_sigterm=False)
    accuracy = held_out_accuracy(trainer, model, datamodule, MulticlassAccuracy(num_classes=4, average="micro"))
    assert test_set.loaded == [1, 4, 7, 10]  # positions 1, 1 + 3, ...: nothing of the other ranks' shards
    model.eval()
    with torch.no_grad():
        shard = test_set.images[[1, 4, 7, 10]]
        expected = (model(shard).argmax(1) == test_set.targets[[1, 4, 7, 10]]).float().mean().item()
    assert accuracy == pytest.approx(expected)  # (no process group here: torchmetrics reduces nothing)


@pytest.mark.skipif(sys.platform == "win32", reason="ddp_spawn with gloo on CPU")
def test_one_round_per_fit_is_refused_under_ddp_spawn(tmp_path: Path) -> None:
    datamodule = ActiveDataModule(train_dataset=SyntheticImages(100, seed=0), test_dataset=SyntheticImages(20, seed=1),
                                  initial_labels=8, batch_size=8, eval_batch_size=16)
    acquisition = AcquisitionCallback("random", query_size=6, pool_size=25, output_dir=str(tmp_path / "run"))
    trainer = pl.Trainer(accelerator="cpu", strategy="ddp_spawn", devices=2, max_epochs=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[acquisition])
    with pytest.raises(Exception, match="One round per fit does not work with a strategy that starts its processes "
                                        "per fit"):
        trainer.fit(ActiveClassifier("small_cnn", num_classes=4, in_channels=1), datamodule=datamodule)
    assert not (tmp_path / "run").exists()


FAILING_SELECTION_SCRIPT = '''
import lightning.pytorch as pl
from saal_lightning import AcquisitionCallback, ActiveClassifier, ActiveDataModule
from saal_lightning.acquisition.strategies import Entropy
from tests.synthetic_data import SyntheticImages


class FailingSelection(Entropy):
    def select(self, pool_outputs, query_size, generator, labeled_outputs=None):
        raise ValueError("select exploded on rank 0")


if __name__ == "__main__":
    datamodule = ActiveDataModule(train_dataset=SyntheticImages(60, seed=0), test_dataset=SyntheticImages(20, seed=1),
                                  initial_labels=8, batch_size=8, eval_batch_size=16)
    acquisition = AcquisitionCallback(FailingSelection(), query_size=4, pool_size=20, num_rounds=1, epochs_per_round=1,
                                      plot=False)
    trainer = pl.Trainer(accelerator="cpu", strategy="ddp", devices=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, reload_dataloaders_every_n_epochs=1,
                         callbacks=[acquisition], default_root_dir=".")
    trainer.fit(ActiveClassifier("small_cnn", num_classes=4, in_channels=1), datamodule=datamodule)
'''


@pytest.mark.skipif(sys.platform == "win32", reason="ddp with gloo on CPU")
def test_a_selection_that_raises_on_rank_zero_ends_every_rank(tmp_path: Path) -> None:
    """Rank 1 waits in the broadcast of rank 0's selection: it must raise too, not wait there forever."""
    import os
    import subprocess

    script = tmp_path / "failing_selection.py"
    script.write_text(FAILING_SELECTION_SCRIPT)
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=240)  # a hang fails the test here instead of stalling the suite
    assert result.returncode != 0
    assert "ValueError: select exploded on rank 0" in result.stderr  # rank 0's own error
    assert ("SelectionFailedError: Round 0: rank 0 failed to select the items to label, so this rank stops too "
            "(ValueError: select exploded on rank 0)") in result.stderr  # rank 1's
