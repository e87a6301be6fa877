"""ActiveDataModule: split invariants, label()/sample_pool() validation, state round trips, real Trainer fits."""

from __future__ import annotations

import io
import pickle

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset, TensorDataset

from saal_lightning.data import ActiveDataModule, read_targets

NUM_CLASSES = 5
PER_CLASS = 8
SIZE = NUM_CLASSES * PER_CLASS  # 40 items; item i has class i % 5 and input value i


class CountingDataset(Dataset):
    """Item ``i`` is ``(tensor([i.]), i % num_classes)``; counts ``__getitem__`` calls, optionally has ``.targets``."""

    def __init__(self, size: int = SIZE, num_classes: int = NUM_CLASSES, targets_attr: str | None = "targets"):
        self.x = torch.arange(size, dtype=torch.float32).unsqueeze(1)
        self.y = torch.arange(size) % num_classes
        self.calls = 0
        if targets_attr is not None:
            setattr(self, targets_attr, self.y.tolist())

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        self.calls += 1
        return self.x[index], int(self.y[index])


def index_dataset(size: int = SIZE, offset: float = 0.0) -> TensorDataset:
    """A plain TensorDataset (no ``.targets``): input ``i + offset``, class ``i % 5``."""
    return TensorDataset(
        torch.arange(size, dtype=torch.float32).unsqueeze(1) + offset, torch.arange(size) % NUM_CLASSES
    )


def make_dm(**kwargs) -> ActiveDataModule:
    kwargs.setdefault("train_dataset", index_dataset())
    kwargs.setdefault("test_dataset", index_dataset(10))
    kwargs.setdefault("initial_labels", 10)
    dm = ActiveDataModule(**kwargs)
    dm.setup("fit")
    return dm


def assert_partition(dm: ActiveDataModule) -> None:
    labeled, unlabeled = set(dm.labeled_indices.tolist()), set(dm.unlabeled_indices.tolist())
    assert not labeled & unlabeled
    assert labeled | unlabeled == set(range(SIZE))
    assert dm.num_labeled == len(labeled) and dm.num_unlabeled == len(unlabeled)
    assert torch.equal(dm.labeled_indices, dm.labeled_indices.sort().values)
    assert torch.equal(dm.unlabeled_indices, dm.unlabeled_indices.sort().values)


# ---------------------------------------------------------------------------------------------- initial split


def test_balanced_initial_set_has_exactly_k_per_class_in_round_0():
    dm = make_dm(initial_labels=15)
    assert_partition(dm)
    assert dm.num_labeled == 15 and dm.num_unlabeled == 25
    assert torch.bincount(dm.targets(dm.labeled_indices), minlength=NUM_CLASSES).tolist() == [3] * NUM_CLASSES
    assert set(dm.labeled_round[dm.labeled_indices].tolist()) == {0}
    assert dm.current_round == 0
    assert dm.summary() == {
        "num_labeled": 15,
        "num_unlabeled": 25,
        "current_round": 0,
        "labeled_per_class": [3, 3, 3, 3, 3],
    }


def test_initial_set_is_seeded_and_leaves_the_global_rng_alone():
    rng_before = torch.get_rng_state()
    first, again, other = (make_dm(seed=seed).labeled_indices for seed in (7, 7, 8))
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_unbalanced_initial_set_is_seeded_random_draw():
    first, again = (make_dm(balanced=False, initial_labels=7, seed=3).labeled_indices for _ in range(2))
    assert first.numel() == 7 and torch.equal(first, again)


def test_an_empty_initial_set_is_refused_with_how_to_start():
    with pytest.raises(ValueError, match=r"initial_labels=0: round 0 trains .*e\.g\. initial_labels=20"):
        make_dm(balanced=False, initial_labels=0)


def test_the_seed_follows_seed_everything_unless_set(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "7")
    assert make_dm().seed == 7 and make_dm(seed=3).seed == 3
    assert torch.equal(make_dm().labeled_indices, make_dm(seed=7).labeled_indices)
    monkeypatch.delenv("PL_GLOBAL_SEED")
    assert make_dm().seed == 0


def test_class_with_too_few_items_for_balanced_set_is_named():
    y = torch.arange(SIZE) % NUM_CLASSES
    y[y == 3] = 2  # class 3 disappears except for one item
    y[3] = 3
    dm = ActiveDataModule(TensorDataset(torch.zeros(SIZE, 1), y), num_classes=NUM_CLASSES, initial_labels=10)
    with pytest.raises(ValueError, match=r"Class 3 has 1 items but the balanced initial set needs 2"):
        dm.setup()
    assert dm.labeled_round is None


@pytest.mark.parametrize("num_classes", [NUM_CLASSES, None])
def test_initial_labels_not_divisible_by_num_classes(num_classes):
    with pytest.raises(ValueError, match=r"initial_labels=12 is not divisible by num_classes=5"):
        ActiveDataModule(index_dataset(), num_classes=num_classes, initial_labels=12)


def test_initial_labels_larger_than_dataset():
    dm = ActiveDataModule(index_dataset(), initial_labels=45, balanced=False)
    with pytest.raises(ValueError, match="initial_labels=45 exceeds the 40 items"):
        dm.setup()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"eval_batch_size": 0}, "eval_batch_size"),
        ({"num_workers": -1}, "num_workers"),
        ({"initial_labels": -5}, "initial_labels"),
        ({"num_classes": 0}, "num_classes"),
    ],
)
def test_bad_constructor_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ActiveDataModule(index_dataset(), **kwargs)


def test_pool_dataset_must_match_train_length():
    with pytest.raises(ValueError, match="pool_dataset has 39 items but train_dataset has 40"):
        ActiveDataModule(index_dataset(), pool_dataset=index_dataset(39))


def test_targets_beyond_num_classes_are_rejected():
    with pytest.raises(ValueError, match="num_classes=3 but the training set has target 4"):
        ActiveDataModule(index_dataset(), num_classes=3, balanced=False)


def test_state_before_setup_is_a_clear_error():
    dm = ActiveDataModule(index_dataset())
    with pytest.raises(RuntimeError, match=r"call setup\(\) first"):
        dm.label([1])
    assert dm.state_dict() == {}


# ------------------------------------------------------------------------------------------- targets / shapes


def test_targets_fast_path_reads_the_attribute_not_the_items():
    data = CountingDataset(targets_attr="targets")
    dm = make_dm(train_dataset=data)
    assert data.calls <= 1  # at most the first item, to infer in_channels
    assert dm.num_classes == NUM_CLASSES
    assert dm.targets(torch.tensor([0, 6, 39])).tolist() == [0, 1, 4]


def test_targets_from_svhn_style_labels_array():
    data = CountingDataset(targets_attr=None)
    data.labels = np.asarray(data.y.numpy(), dtype=np.int64)
    dm = make_dm(train_dataset=data)
    assert data.calls <= 1
    assert dm.targets(torch.tensor([3, 4])).tolist() == [3, 4]


def test_targets_fallback_iterates_once_and_caches():
    data = CountingDataset(targets_attr=None)
    dm = make_dm(train_dataset=data)
    calls_after_setup = data.calls
    assert SIZE <= calls_after_setup <= SIZE + 1  # one pass over the items (+ the in_channels probe)
    dm.setup("fit")
    dm.targets(dm.unlabeled_indices)
    dm.summary()
    assert data.calls == calls_after_setup
    assert torch.equal(read_targets(data), data.y)


def test_targets_attribute_of_wrong_length_is_rejected():
    data = CountingDataset()
    data.targets = data.targets[:-1]
    with pytest.raises(ValueError, match=r"dataset.targets has shape \(39,\), expected \(40,\)"):
        ActiveDataModule(data)


def test_num_classes_and_in_channels_inference():
    images = TensorDataset(torch.zeros(SIZE, 3, 4, 4), torch.arange(SIZE) % 4)
    dm = ActiveDataModule(images, initial_labels=8)
    assert (dm.num_classes, dm.in_channels) == (4, 3)
    flat = ActiveDataModule(index_dataset())
    assert (flat.num_classes, flat.in_channels) == (NUM_CLASSES, None)


# ------------------------------------------------------------------------------------------------------ label


def test_label_rounds_keep_the_partition_and_record_rounds():
    dm = make_dm()
    initial = set(dm.labeled_indices.tolist())
    generator = torch.Generator().manual_seed(0)
    acquired = []
    for expected_round in (1, 2, 3):
        batch = dm.sample_pool(10, generator)[:4]
        dm.label(batch)
        acquired.append(set(batch.tolist()))
        assert dm.current_round == expected_round
        assert set(dm.labeled_round[batch].tolist()) == {expected_round}
        assert_partition(dm)
    assert dm.num_labeled == 10 + 12
    assert set(dm.labeled_indices.tolist()) == initial.union(*acquired)
    # an explicit round, from a list of Python ints and from numpy
    dm.label([dm.unlabeled_indices[0].item()], round=7)
    dm.label(np.asarray(dm.unlabeled_indices[:2]), round=np.int64(8))
    assert dm.current_round == 8 and dm.num_labeled == 25
    assert_partition(dm)


@pytest.mark.parametrize(
    ("indices", "message"),
    [
        (torch.tensor([3, 40]), r"out of range \[0, 40\): \[40\]"),
        ([-1, 2], r"out of range \[0, 40\): \[-1\]"),
        ("labeled", r"already labeled: \[\d+\] \(in rounds \[0\]\)"),
        ("duplicated", r"duplicated indices in one request: \[\d+\]"),
        (torch.tensor([1.0, 2.0]), "integer indices, got dtype torch.float32"),
        (torch.tensor([True, False]), "integer indices, got dtype torch.bool"),
        ([], "got no indices"),
        (torch.empty(0, dtype=torch.long), "got no indices"),
        (torch.tensor([[1, 2], [3, 4]]), r"1-D sequence of indices, got shape \(2, 2\)"),
    ],
)
def test_label_rejects_bad_requests_without_changing_state(indices, message):
    dm = make_dm()
    free = dm.unlabeled_indices
    if isinstance(indices, str) and indices == "labeled":
        indices = torch.cat([free[:2], dm.labeled_indices[:1]])
    elif isinstance(indices, str):
        indices = torch.stack([free[0], free[1], free[0]])
    before = dm.labeled_round.clone()
    with pytest.raises(ValueError, match=message):
        dm.label(indices)
    assert torch.equal(dm.labeled_round, before)


@pytest.mark.parametrize("bad_round", [-1, 1.5, True])
def test_label_rejects_bad_round_without_changing_state(bad_round):
    dm = make_dm()
    before = dm.labeled_round.clone()
    with pytest.raises(ValueError, match="round must be an int >= 0"):
        dm.label(dm.unlabeled_indices[:2], round=bad_round)
    assert torch.equal(dm.labeled_round, before)


# ------------------------------------------------------------------------------------------------ sample_pool


def test_sample_pool_properties():
    dm = make_dm()
    rng_before = torch.get_rng_state()
    pool = dm.sample_pool(12, torch.Generator().manual_seed(5))
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert pool.dtype == torch.long and pool.numel() == 12 and pool.unique().numel() == 12
    assert torch.equal(pool, pool.sort().values)
    assert set(pool.tolist()) <= set(dm.unlabeled_indices.tolist())
    assert torch.equal(pool, dm.sample_pool(12, torch.Generator().manual_seed(5)))
    assert not torch.equal(pool, dm.sample_pool(12, torch.Generator().manual_seed(6)))
    # the whole remainder is a valid request
    assert torch.equal(dm.sample_pool(30, torch.Generator()), dm.unlabeled_indices)


def test_sample_pool_beyond_what_is_left():
    dm = make_dm()
    with pytest.raises(ValueError, match="more than is left: 30 unlabeled"):
        dm.sample_pool(31, torch.Generator())
    with pytest.raises(ValueError, match="must be positive"):
        dm.sample_pool(0, torch.Generator())


# ------------------------------------------------------------------------------------------------------ state


def roundtrip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_state_dict_round_trip_with_weights_only_load():
    dm = make_dm(seed=3)
    dm.label(dm.sample_pool(6, torch.Generator().manual_seed(0)))
    state = roundtrip(dm.state_dict())
    assert set(state) == {"labeled_round", "labels", "seed", "dataset_size", "round_start"}
    assert state["dataset_size"] == SIZE and state["seed"] == 3

    fresh = ActiveDataModule(index_dataset(), initial_labels=10, seed=3)
    fresh.load_state_dict(state)
    fresh.setup("fit")  # Lightning calls setup again on the next fit: it must not overwrite the restored split
    assert torch.equal(fresh.labeled_round, dm.labeled_round)
    assert fresh.current_round == 1 and fresh.num_labeled == 16
    # the state is a copy: labelling one module does not change the other
    fresh.label(fresh.unlabeled_indices[:1])
    assert dm.num_labeled == 16


def test_setup_is_idempotent_and_keeps_labels():
    dm = make_dm()
    dm.label(dm.unlabeled_indices[:3])
    before = dm.labeled_round.clone()
    dm.setup("fit")
    dm.setup("test")
    assert torch.equal(dm.labeled_round, before)


def test_load_state_dict_rejects_a_different_dataset():
    state = make_dm().state_dict()
    other = ActiveDataModule(index_dataset(30), initial_labels=10)
    with pytest.raises(ValueError, match="covers 40 items but the training set has 30"):
        other.load_state_dict(state)
    assert other.labeled_round is None
    with pytest.raises(ValueError, match="missing"):
        other.load_state_dict({"labeled_round": state["labeled_round"]})


def test_restored_split_is_checked_against_a_lazily_built_dataset():
    state = make_dm().state_dict()
    lazy = ActiveDataModule(initial_labels=10)  # a subclass would build train_dataset in setup()
    lazy.load_state_dict(state)
    lazy.train_dataset = index_dataset(30)
    with pytest.raises(ValueError, match="restored split covers 40 items but the training set has 30"):
        lazy.setup()


def test_datamodule_pickles_for_ddp_spawn():
    dm = make_dm(val_dataset=index_dataset(7))
    dm.label(dm.unlabeled_indices[:3])
    copy = pickle.loads(pickle.dumps(dm))
    assert torch.equal(copy.labeled_round, dm.labeled_round)
    assert loader_indices(copy.val_dataloader()) == list(range(7))
    assert loader_indices(copy.train_dataloader()) == loader_indices(dm.train_dataloader())


def test_restoring_another_seed_warns_and_keeps_the_configured_one():
    # The acquisition callback refuses such a resume; the data module alone keeps what it was configured with.
    state = make_dm(seed=1).state_dict()
    dm = ActiveDataModule(index_dataset(), initial_labels=10, seed=2)
    with pytest.warns(UserWarning, match="seed=1 into a data module with seed=2"):
        dm.load_state_dict(state)
    assert dm.seed == 2 and torch.equal(dm.labeled_round, state["labeled_round"])


# ------------------------------------------------------------------------------------------------ dataloaders


def loader_indices(loader) -> list[int]:
    return [int(v) for x, _ in loader for v in x[:, 0]]


def test_train_dataloader_follows_the_labels_and_spares_the_global_rng():
    dm = make_dm(batch_size=4)
    rng_before = torch.get_rng_state()
    loader = dm.train_dataloader()
    seen = loader_indices(loader)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert sorted(seen) == dm.labeled_indices.tolist()
    assert len(loader) == 3  # 10 items, batch 4, drop_last=False
    assert seen == loader_indices(make_dm(batch_size=4).train_dataloader())  # seeded shuffle

    new = dm.unlabeled_indices[:5]
    dm.label(new)
    seen = loader_indices(dm.train_dataloader())
    assert sorted(seen) == dm.labeled_indices.tolist() and set(new.tolist()) <= set(seen)


def test_pool_test_and_val_loaders():
    dm = make_dm(pool_dataset=index_dataset(offset=1000.0), eval_batch_size=3)
    order = torch.tensor([9, 2, 30, 5])
    loader = dm.pool_dataloader(order)
    assert [len(x) for x, _ in loader] == [3, 1]
    assert loader_indices(loader) == [1009, 1002, 1030, 1005]  # the pool set, in the given order
    with pytest.raises(ValueError, match="out of range"):
        dm.pool_dataloader(torch.tensor([40]))
    assert loader_indices(dm.test_dataloader()) == list(range(10))
    assert dm.val_dataloader is None
    with pytest.raises(ValueError, match="no test_dataset"):
        make_dm(test_dataset=None).test_dataloader()
    val = make_dm(val_dataset=index_dataset(7)).val_dataloader()
    assert loader_indices(val) == list(range(7))


# --------------------------------------------------------------------------------------------- real Trainer


class IndexRecorder(pl.LightningModule):
    """Records which item indices every training epoch saw, and how many validation items."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(1, NUM_CLASSES)
        self.seen: dict[int, list[int]] = {}
        self.val_items = 0

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.seen.setdefault(self.current_epoch, []).extend(x[:, 0].long().tolist())
        return F.cross_entropy(self.layer(x), y)

    def validation_step(self, batch, batch_idx):
        self.val_items += len(batch[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class LabelAtEpochEnd(pl.Callback):
    """Labels ``count`` more items at the end of every epoch (what the acquisition callback does)."""

    def __init__(self, count: int) -> None:
        self.count = count

    def on_train_epoch_end(self, trainer, pl_module):
        trainer.datamodule.label(trainer.datamodule.unlabeled_indices[: self.count])


def trainer(**kwargs) -> pl.Trainer:
    defaults = dict(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return pl.Trainer(**{**defaults, **kwargs})


@pytest.mark.parametrize("with_val", [False, True])
def test_fit_trains_on_the_labeled_set(with_val):
    dm = ActiveDataModule(
        index_dataset(), val_dataset=index_dataset(7) if with_val else None, initial_labels=10, batch_size=4
    )
    model = IndexRecorder()
    if with_val:
        trainer().fit(model, datamodule=dm)
    else:  # Lightning's own "no validation data" path, not an empty loader
        with pytest.warns(UserWarning, match="no `val_dataloader`. Skipping val loop"):
            trainer().fit(model, datamodule=dm)
    assert sorted(model.seen[0]) == dm.labeled_indices.tolist()
    # with validation: the sanity check (2 batches of 256 -> all 7) plus the end-of-epoch run
    assert model.val_items == (14 if with_val else 0)


@pytest.mark.filterwarnings("ignore:.*Skipping val loop")
def test_reloaded_train_loader_sees_labels_added_during_fit():
    dm = ActiveDataModule(index_dataset(), initial_labels=10, batch_size=4)
    model = IndexRecorder()
    trainer(max_epochs=3, reload_dataloaders_every_n_epochs=1, callbacks=[LabelAtEpochEnd(5)]).fit(model, dm)
    assert [len(model.seen[epoch]) for epoch in range(3)] == [10, 15, 20]
    assert dm.num_labeled == 25 and dm.current_round == 3


@pytest.mark.filterwarnings("ignore:.*Skipping val loop")
def test_checkpoint_resume_restores_the_split(tmp_path):
    dm = ActiveDataModule(index_dataset(), initial_labels=10, batch_size=4, seed=4)
    first = trainer(callbacks=[LabelAtEpochEnd(5)])
    first.fit(IndexRecorder(), dm)
    first.save_checkpoint(tmp_path / "round.ckpt")
    assert dm.num_labeled == 15

    resumed_dm = ActiveDataModule(index_dataset(), initial_labels=10, batch_size=4, seed=4)
    model = IndexRecorder()
    trainer(max_epochs=2).fit(model, resumed_dm, ckpt_path=tmp_path / "round.ckpt")
    assert torch.equal(resumed_dm.labeled_round, dm.labeled_round)
    assert sorted(model.seen[1]) == dm.labeled_indices.tolist()


def test_read_targets_fallback_with_progress_for_large_datasets():
    data = CountingDataset(size=10_001, targets_attr=None)
    targets = read_targets(data)
    assert data.calls == 10_001 and torch.equal(targets, torch.arange(10_001) % NUM_CLASSES)


@pytest.mark.parametrize(("option", "value", "message"), [
    ("batch_size", 2.5, "batch_size must be an integer >= 1, got 2.5"),
    ("batch_size", True, "batch_size must be an integer >= 1, got True"),
    ("eval_batch_size", 0, "eval_batch_size must be an integer >= 1, got 0"),
    ("num_workers", -1, "num_workers must be an integer >= 0, got -1"),
    ("initial_labels", 10.0, "initial_labels must be an integer >= 0, got 10.0"),
    ("num_classes", 5.5, "num_classes must be an integer >= 1 or None, got 5.5"),
    ("oracle", "robot", "oracle must be one of 'simulated', 'human', got 'robot'"),
])
def test_options_of_the_wrong_type_are_refused_with_one_message_shape(option, value, message) -> None:
    data = TensorDataset(torch.randn(20, 3), torch.arange(20) % 5)
    with pytest.raises(ValueError) as refused:
        ActiveDataModule(data, data, **{"initial_labels": 10, option: value})
    assert str(refused.value) == message


def test_a_dataset_without_len_is_refused_naming_the_fix() -> None:
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield torch.zeros(3), 0

    with pytest.raises(TypeError, match="Stream has no len\\(\\): .* needs a map-style dataset"):
        ActiveDataModule(Stream(), Stream(), initial_labels=1)
