"""The labeled/unlabeled split of one training set, as a Lightning data module.

The whole active-learning state is one int64 tensor, ``labeled_round``, with one entry per training item:
``-1`` for unlabeled, ``r >= 0`` for "labeled in acquisition round ``r``" (``0`` is the initial set). The labeled
and unlabeled index sets, the number of labeled items and the current round all derive from it, so they can never
disagree, and it is exactly what a checkpoint stores.

Lightning calls :meth:`ActiveDataModule.setup` on every fit and *before* it restores a checkpoint's data-module
state, so ``setup`` creates the initial split once and never overwrites an existing one, and
:meth:`ActiveDataModule.train_dataloader` reads the labeled indices at call time (the trainer reloads it when
``reload_dataloaders_every_n_epochs`` says so).
"""

from __future__ import annotations

import hashlib
import operator
from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from typing import Any, Literal, get_args

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from rich.progress import track
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from saal_lightning.experiment_seed import resolve_seed
from saal_lightning.option_checks import check_choice, check_int

Oracle = Literal["simulated", "human"]

# Reading targets item by item decodes every image; show progress when that takes noticeable time.
_PROGRESS_THRESHOLD = 10_000
# How many offending values an error message lists before it only gives the count.
_MAX_LISTED = 10


def _listing(values: torch.Tensor) -> str:
    shown = values[:_MAX_LISTED].tolist()
    more = f" and {values.numel() - _MAX_LISTED} more" if values.numel() > _MAX_LISTED else ""
    return f"{shown}{more}"


def _as_index_tensor(indices: Sequence[int] | torch.Tensor, size: int, what: str) -> torch.Tensor:
    """Check that ``indices`` is a 1-D integer sequence of positions in ``[0, size)``; return it as int64."""
    if isinstance(indices, torch.Tensor):
        tensor = indices
    else:
        array = np.asarray(indices)
        # numpy reads an empty list as float64; an empty request gets its own, clearer error from the caller.
        tensor = torch.as_tensor(array.astype(np.int64) if array.size == 0 else array)
    # bool is rejected as well: a bool tensor is a mask, and indexing with it would mean something else.
    if tensor.dtype == torch.bool or tensor.dtype.is_floating_point or tensor.dtype.is_complex:
        raise ValueError(f"{what} expects integer indices, got dtype {tensor.dtype}")
    if tensor.dim() != 1:
        raise ValueError(f"{what} expects a 1-D sequence of indices, got shape {tuple(tensor.shape)}")
    tensor = tensor.long().cpu()
    out_of_range = tensor[(tensor < 0) | (tensor >= size)]
    if out_of_range.numel():
        raise ValueError(f"{what}: indices out of range [0, {size}): {_listing(out_of_range)}")
    return tensor


def dataset_length(dataset: Dataset) -> int:
    """The number of items of a map-style dataset; an iterable-style one (no ``len``) is refused."""
    if not isinstance(dataset, Sized):
        raise TypeError(f"{type(dataset).__name__} has no len(): active learning indexes its items, so it needs a "
                        "map-style dataset (__getitem__ and __len__), not an IterableDataset")
    return len(dataset)


def read_targets(dataset: Dataset) -> torch.Tensor:
    """The class index of every item of ``dataset``, as an int64 tensor.

    Uses ``dataset.targets`` (torchvision's MNIST/CIFAR) or ``dataset.labels`` (SVHN) when present, which is
    instant; otherwise reads ``dataset[i][1]`` for every item once, which decodes and transforms every input.
    """
    size = dataset_length(dataset)
    for attribute in ("targets", "labels"):
        values = getattr(dataset, attribute, None)
        if values is not None:
            targets = torch.as_tensor(np.asarray(values) if not isinstance(values, torch.Tensor) else values)
            if targets.dim() != 1 or targets.numel() != size:
                raise ValueError(
                    f"dataset.{attribute} has shape {tuple(targets.shape)}, expected ({size},): "
                    "one class index per item"
                )
            return targets.long().cpu()
    positions: Iterable[int] = range(size)
    if size > _PROGRESS_THRESHOLD:
        positions = track(positions, description="Reading targets", total=size, transient=True)
    return torch.tensor([int(dataset[i][1]) for i in positions], dtype=torch.long)


class ActiveDataModule(pl.LightningDataModule):
    """A training set split into labeled and unlabeled items, plus a held-out test set.

    Labels come from an oracle. The simulated one (``oracle="simulated"``, for benchmarks) reads the training
    set's own targets when :meth:`label` is called without labels. A human one (``oracle="human"``) never reads
    a target: the training set may return inputs only, the run starts from no labels (or the labels a subclass
    loads), and ``label(indices, labels)`` takes the labels a person gave. Either way :meth:`label` moves items to
    the labeled set with their labels, and :meth:`train_dataloader` iterates over the labeled items only. The
    acquisition callback draws a random candidate pool with :meth:`sample_pool` and scores it through
    :meth:`pool_dataloader`.

    The initial labeled set is drawn on the first :meth:`setup` with a dedicated ``torch.Generator`` seeded by
    ``seed``, so every DDP rank draws the same set and the global RNG is untouched.

    Args:
        train_dataset: the training set the labeled and unlabeled items come from; it may apply training
            augmentation. Subclasses may leave it ``None`` and build it in :meth:`setup`.
        test_dataset: the held-out evaluation set used by :meth:`test_dataloader`.
        pool_dataset: the same items as ``train_dataset``, in the same order, without training augmentation;
            used to score the pool. Defaults to ``train_dataset``.
        val_dataset: an optional validation set. Without one, ``val_dataloader`` is ``None`` and Lightning skips
            validation.
        num_classes: the number of classes; inferred as ``max(target) + 1`` when ``None`` (the attribute of the
            same name holds the value in use).
        initial_labels: the size of the initial labeled set (round 0) that the simulated oracle draws; at least
            1, since round 0 trains on it. With ``oracle="human"`` it must be 0: people give the first labels.
        balanced: draw the initial set as ``initial_labels // num_classes`` items of every class (the SAAL
            protocol); otherwise draw it uniformly at random.
        batch_size: the training batch size.
        eval_batch_size: the batch size of the test, validation and pool loaders.
        num_workers: worker processes for every loader.
        seed: seeds the initial draw and the training loader's shuffling; ``None`` takes the seed of
            ``seed_everything`` (0 without one).
        oracle: ``"simulated"`` (labels are the training set's targets) or ``"human"`` (labels are given to
            :meth:`label`; targets are never read).
        classes: the class names, in label order (``num_classes`` is their count); people label with these
            names. Defaults to ``"0"``, ``"1"``, ...

    Attributes:
        in_channels: the channel count of a CHW image input, inferred from the first training item; ``None``
            when the input is not a CHW tensor.
        labeled_round: int64 tensor, one entry per training item: ``-1`` unlabeled, ``r`` labeled in round
            ``r``; ``None`` before :meth:`setup`.

    Raises:
        ValueError: for a non-positive batch size or ``initial_labels``, a negative ``num_workers``, a
            ``pool_dataset`` whose length differs from ``train_dataset``'s, targets outside
            ``[0, num_classes)``, or (with ``balanced``) ``initial_labels`` not divisible by ``num_classes``.

    Example::

        >>> from torch.utils.data import TensorDataset
        >>> data = TensorDataset(torch.randn(100, 3), torch.arange(100) % 5)
        >>> dm = ActiveDataModule(data, data, initial_labels=10)
        >>> dm.setup("fit")
        >>> dm.num_labeled, dm.summary()["labeled_per_class"]
        (10, [2, 2, 2, 2, 2])
        >>> pool = dm.sample_pool(20, torch.Generator().manual_seed(0))
        >>> dm.label(pool[:5])
        >>> dm.num_labeled, dm.current_round
        (15, 1)
    """

    def __init__(
        self,
        train_dataset: Dataset | None = None,
        test_dataset: Dataset | None = None,
        pool_dataset: Dataset | None = None,
        val_dataset: Dataset | None = None,
        num_classes: int | None = None,
        initial_labels: int = 20,
        balanced: bool = True,
        batch_size: int = 10,
        eval_batch_size: int = 256,
        num_workers: int = 0,
        seed: int | None = None,
        oracle: Oracle = "simulated",
        classes: list[str] | None = None,
    ) -> None:
        super().__init__()
        check_choice("oracle", oracle, get_args(Oracle))
        check_int("initial_labels", initial_labels, minimum=0)  # 0 is refused below with how to start
        check_int("batch_size", batch_size, minimum=1)
        check_int("eval_batch_size", eval_batch_size, minimum=1)
        check_int("num_workers", num_workers, minimum=0)
        check_int("num_classes", num_classes, minimum=1, allow_none=True)
        if classes is not None:
            if len(classes) < 1 or len(set(classes)) != len(classes) or not all(isinstance(c, str) and c for c in
                                                                                  classes):
                raise ValueError(f"classes must be distinct, non-empty names, got {classes!r}")
            if num_classes is not None and num_classes != len(classes):
                raise ValueError(f"num_classes={num_classes} but {len(classes)} classes are named")
            num_classes = len(classes)
        if oracle == "human":
            if initial_labels != 0:
                raise ValueError(f"initial_labels={initial_labels} with oracle='human': people give the labels, "
                                 "so there is no initial draw; pass initial_labels=0")
            if num_classes is None:
                raise ValueError("oracle='human' needs num_classes or classes: the labels are not in the data")
        elif initial_labels == 0:
            raise ValueError(
                "initial_labels=0: round 0 trains the model on the initial labeled set, so it needs at least one "
                "labeled item; start with a few per class (e.g. initial_labels=20 for 10 classes)"
            )
        self.train_dataset = train_dataset
        self.test_dataset = test_dataset
        self.pool_dataset = pool_dataset
        self.val_dataset = val_dataset
        self.num_classes = num_classes
        self.in_channels: int | None = None
        self.initial_labels = initial_labels
        self.balanced = balanced
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.seed = resolve_seed(seed)
        self.oracle = oracle
        self.classes = classes
        self.labeled_round: torch.Tensor | None = None
        # The label of every item, -1 where none is known: what training uses, whoever gave it.
        self.labels: torch.Tensor | None = None
        self._targets: torch.Tensor | None = None
        self._attached: Dataset | None = None
        # (labeled count, first epoch trained on it): where the current round's epochs start counting.
        self._round_start: tuple[int, int] | None = None
        self._check_balanced_divisible()
        # With the datasets given up front, num_classes and in_channels are known now, which the CLI's
        # `data.num_classes -> model` link needs before setup() runs.
        if train_dataset is not None:
            self._attach_datasets()

    # ------------------------------------------------------------------------------------------------ setup

    def setup(self, stage: str | None = None) -> None:
        """Create the initial split on the first call; later calls (and a restored state) are left as they are.

        Subclasses build their datasets first and then call ``super().setup(stage)``.

        Raises:
            ValueError: without a training set, or when an existing (restored) split does not match the
                training set's length.
        """
        if self.train_dataset is None:
            raise ValueError(
                f"{type(self).__name__} has no train_dataset: pass one, or build it in a subclass's setup() "
                "before calling super().setup()"
            )
        self._attach_datasets()
        if self.labeled_round is None:
            self.labeled_round = self._initial_split()
            self.labels = torch.full_like(self.labeled_round, -1)
            initial = self.labeled_indices
            if initial.numel():
                self.labels[initial] = self._train_targets()[initial]
        elif self.labeled_round.numel() != dataset_length(self.train_dataset):
            raise ValueError(
                f"The restored split covers {self.labeled_round.numel()} items but the training set has "
                f"{dataset_length(self.train_dataset)}: the checkpoint was made with a different data set"
            )

    def _attach_datasets(self) -> None:
        """Validate the datasets and infer ``num_classes``/``in_channels``, once per training set."""
        train = self._require_train_dataset()
        if self._attached is train:
            return
        self._targets = None
        if self.pool_dataset is None:
            self.pool_dataset = train
        elif dataset_length(self.pool_dataset) != dataset_length(train):
            raise ValueError(
                f"pool_dataset has {dataset_length(self.pool_dataset)} items but train_dataset has "
                f"{dataset_length(train)}: "
                "the pool must hold the same items in the same order (without augmentation)"
            )
        if self.oracle == "simulated":
            targets = self._train_targets()
            if targets.numel() and targets.min() < 0:
                raise ValueError(f"Targets must be class indices >= 0, found {int(targets.min())}")
            if self.num_classes is None:
                self.num_classes = int(targets.max()) + 1 if targets.numel() else 0
                self._check_balanced_divisible()
            elif targets.numel() and targets.max() >= self.num_classes:
                raise ValueError(f"num_classes={self.num_classes} but the training set has target "
                                 f"{int(targets.max())}")
        if self.in_channels is None and dataset_length(train):
            first = _input_of(train[0])
            if isinstance(first, torch.Tensor) and first.dim() == 3:
                self.in_channels = int(first.shape[0])
        self._attached = train

    def _check_balanced_divisible(self) -> None:
        if self.balanced and self.num_classes and self.initial_labels % self.num_classes:
            raise ValueError(
                f"initial_labels={self.initial_labels} is not divisible by num_classes={self.num_classes}: a "
                f"balanced initial set takes the same number of items from every class; use a multiple of "
                f"{self.num_classes} or balanced=False"
            )

    def _require_train_dataset(self) -> Dataset:
        if self.train_dataset is None:
            raise RuntimeError(f"{type(self).__name__} has no training set yet: call setup() first (Trainer.fit does)")
        return self.train_dataset

    def _require_num_classes(self) -> int:
        if self.num_classes is None:
            raise RuntimeError(f"{type(self).__name__} does not know num_classes yet: call setup() first")
        return self.num_classes

    def _train_targets(self) -> torch.Tensor:
        if self.oracle == "human":
            raise RuntimeError(f"{type(self).__name__} has oracle='human': its targets are never read; label "
                               "items with label(indices, labels)")
        if self._targets is None:
            self._targets = read_targets(self._require_train_dataset())
        return self._targets

    def _initial_split(self) -> torch.Tensor:
        """Draw the round-0 labeled set with a generator of its own, so the global RNG stream is untouched."""
        if self.oracle == "human":
            return torch.full((dataset_length(self._require_train_dataset()),), -1, dtype=torch.long)
        targets = self._train_targets()
        size = targets.numel()
        if self.initial_labels > size:
            raise ValueError(f"initial_labels={self.initial_labels} exceeds the {size} items of the training set")
        generator = torch.Generator().manual_seed(self.seed)
        num_classes = self._require_num_classes()
        if self.balanced and self.initial_labels:
            per_class = self.initial_labels // num_classes
            chosen = []
            for cls in range(num_classes):
                members = torch.nonzero(targets == cls).flatten()
                if members.numel() < per_class:
                    raise ValueError(
                        f"Class {cls} has {members.numel()} items but the balanced initial set needs {per_class} "
                        f"per class (initial_labels={self.initial_labels}, num_classes={self.num_classes})"
                    )
                chosen.append(members[torch.randperm(members.numel(), generator=generator)[:per_class]])
            initial = torch.cat(chosen)
        else:
            initial = torch.randperm(size, generator=generator)[: self.initial_labels]
        labeled_round = torch.full((size,), -1, dtype=torch.long)
        labeled_round[initial] = 0
        return labeled_round

    # ------------------------------------------------------------------------------------------------ state

    def _state(self) -> torch.Tensor:
        if self.labeled_round is None:
            raise RuntimeError(f"{type(self).__name__} has no split yet: call setup() first (Trainer.fit does)")
        return self.labeled_round

    @property
    def labeled_indices(self) -> torch.Tensor:
        """Indices of the labeled items, ascending (int64)."""
        return torch.nonzero(self._state() >= 0).flatten()

    @property
    def unlabeled_indices(self) -> torch.Tensor:
        """Indices of the unlabeled items, ascending (int64)."""
        return torch.nonzero(self._state() < 0).flatten()

    @property
    def num_labeled(self) -> int:
        """The number of labeled items."""
        return int((self._state() >= 0).sum())

    @property
    def num_unlabeled(self) -> int:
        """The number of unlabeled items."""
        return int((self._state() < 0).sum())

    @property
    def current_round(self) -> int:
        """The latest round anything was labeled in; 0 for the initial set (even an empty one)."""
        return max(int(self._state().max()), 0) if self._state().numel() else 0

    def targets(self, indices: torch.Tensor) -> torch.Tensor:
        """The oracle's class indices for the given training-set indices (int64, same order)."""
        size = dataset_length(self._require_train_dataset())
        return self._train_targets()[_as_index_tensor(indices, size, "targets()")]

    def label(
        self,
        indices: Sequence[int] | torch.Tensor,
        labels: Sequence[int] | torch.Tensor | None = None,
        round: int | None = None,
    ) -> None:
        """Move unlabeled items to the labeled set with their labels, recording the round they were labeled in.

        Every check runs before anything changes: a rejected request leaves the labeled set as it was.

        Args:
            indices: training-set indices of unlabeled items, a 1-D integer sequence without repeats.
            labels: the class index a person gave each item, in the same order; ``None`` asks the simulated
                oracle (the training set's targets of these items).
            round: the acquisition round to record; defaults to ``current_round + 1``.

        Raises:
            ValueError: for non-integer or non-1-D indices, an empty request, indices out of range, indices
                that are already labeled or repeated within the request, labels of another length or outside
                ``[0, num_classes)``, no labels with ``oracle="human"``, or a negative round.
        """
        state = self._state()
        index = _as_index_tensor(indices, state.numel(), "label()")
        if index.numel() == 0:
            raise ValueError("label() got no indices: nothing to label")
        unique, counts = torch.unique(index, return_counts=True)
        if (counts > 1).any():
            raise ValueError(f"label(): duplicated indices in one request: {_listing(unique[counts > 1])}")
        already = index[state[index] >= 0]
        if already.numel():
            raise ValueError(
                f"label(): indices already labeled: {_listing(already)} (in rounds {_listing(state[already])})"
            )
        if labels is None:
            if self.oracle == "human":
                raise ValueError("label(): this data module's labels come from people (oracle='human'): pass "
                                 "label(indices, labels)")
            given = self._train_targets()[index]
        else:
            given = _as_index_tensor(labels, self.num_classes or 0, "label() labels")
            if given.numel() != index.numel():
                raise ValueError(f"label(): {index.numel()} indices but {given.numel()} labels")
        if round is None:
            round = self.current_round + 1
        try:
            # operator.index accepts Python, numpy and 0-d tensor integers alike, and nothing fractional.
            valid_round = not isinstance(round, bool) and operator.index(round) >= 0
        except TypeError:
            valid_round = False
        if not valid_round:
            raise ValueError(f"label(): round must be an int >= 0, got {round!r}")
        state[index] = operator.index(round)
        assert self.labels is not None
        self.labels[index] = given

    def sample_pool(self, size: int, generator: torch.Generator) -> torch.Tensor:
        """A uniformly random subset of the unlabeled indices, drawn with ``generator``, sorted ascending.

        Args:
            size: how many unlabeled items to draw (without replacement).
            generator: a CPU generator the caller owns (and checkpoints); the global RNG is not used.

        Raises:
            ValueError: when ``size`` is not positive or larger than the number of unlabeled items left.
        """
        if size <= 0:
            raise ValueError(f"sample_pool(size={size}): size must be positive")
        unlabeled = self.unlabeled_indices
        if size > unlabeled.numel():
            raise ValueError(f"sample_pool(size={size}) asks for more than is left: {unlabeled.numel()} unlabeled")
        chosen = torch.randperm(unlabeled.numel(), generator=generator)[:size]
        return unlabeled[chosen].sort().values

    @property
    def class_names(self) -> list[str]:
        """The name of every class, in label order."""
        return list(self.classes) if self.classes is not None else [str(c) for c in range(self.num_classes or 0)]

    def item_names(self, indices: torch.Tensor) -> list[str]:
        """How people find the items at ``indices`` (a file path for a folder of images; here the index)."""
        return [str(int(i)) for i in indices]

    def summary(self) -> dict[str, Any]:
        """Counts for logs: ``num_labeled``, ``num_unlabeled``, ``current_round``, ``labeled_per_class``."""
        assert self.labels is not None
        labeled = self.labels[self.labeled_indices]
        return {
            "num_labeled": self.num_labeled,
            "num_unlabeled": self.num_unlabeled,
            "current_round": self.current_round,
            "labeled_per_class": torch.bincount(labeled, minlength=self.num_classes or 0).tolist(),
        }

    def fingerprint(self) -> str:
        """A SHA-256 digest of the data set's identity: a resumed run checks it is the same data set.

        The simulated oracle's targets; with people as the oracle (no targets), the items' names.
        """
        if self.oracle == "human":
            names = self.item_names(torch.arange(dataset_length(self._require_train_dataset())))
            return hashlib.sha256("\n".join(names).encode()).hexdigest()
        return hashlib.sha256(self._train_targets().numpy().tobytes()).hexdigest()

    def state_dict(self) -> dict[str, Any]:
        """The split as tensors and primitives only, so checkpoints load with ``torch.load(weights_only=True)``."""
        if self.labeled_round is None:
            return {}
        return {
            "labeled_round": self.labeled_round.clone(),
            "labels": self.labels.clone() if self.labels is not None else None,
            "seed": self.seed,
            "dataset_size": self.labeled_round.numel(),
            "round_start": list(self._round_start) if self._round_start is not None else None,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; the split replaces any existing one.

        The configured ``seed`` stays (with a warning when the checkpoint's differs: the training order then
        differs from the run that wrote it); the acquisition callback refuses such a resume.

        Raises:
            ValueError: when the state is malformed or was made for a training set of a different size.
        """
        missing = {"labeled_round", "seed", "dataset_size"} - set(state_dict)
        if missing:
            raise ValueError(f"{type(self).__name__} state is missing {sorted(missing)}")
        labeled_round = torch.as_tensor(state_dict["labeled_round"])
        size = int(state_dict["dataset_size"])
        if labeled_round.dtype != torch.long or labeled_round.shape != (size,) or (labeled_round < -1).any():
            raise ValueError(
                f"labeled_round must be an int64 tensor of shape ({size},) with values >= -1, got "
                f"{labeled_round.dtype} of shape {tuple(labeled_round.shape)}"
            )
        # A subclass may not have built its training set yet (Lightning restores after setup, but a user may
        # not); setup() then repeats this check.
        if self.train_dataset is not None and size != dataset_length(self.train_dataset):
            raise ValueError(
                f"The checkpoint's split covers {size} items but the training set has "
                f"{dataset_length(self.train_dataset)}: "
                "it was made with a different data set"
            )
        if int(state_dict["seed"]) != self.seed:
            rank_zero_warn(f"Restoring the split of a run with seed={state_dict['seed']} into a data module with "
                           f"seed={self.seed}: the training order will differ from that run's")
        self.labeled_round = labeled_round.clone()
        labels = state_dict.get("labels")
        if labels is None:  # a checkpoint from before labels were stored: the simulated oracle's targets
            labels = torch.full_like(labeled_round, -1)
            labels[labeled_round >= 0] = self._train_targets()[labeled_round >= 0]
        self.labels = torch.as_tensor(labels).clone()
        round_start = state_dict.get("round_start")
        self._round_start = (int(round_start[0]), int(round_start[1])) if round_start is not None else None

    # ------------------------------------------------------------------------------------------ dataloaders

    def _epoch_in_round(self) -> int:
        """The trainer's epoch counted from the first epoch that trained on the current labeled set.

        Both round schedules (a fit per round with a new Trainer, whose epochs restart at 0, and rounds inside
        one fit, whose epochs keep counting) then give round ``r``'s ``k``-th epoch the same training order.
        """
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        if self._round_start is None or self._round_start[0] != self.num_labeled:
            self._round_start = (self.num_labeled, epoch)
        return epoch - self._round_start[1]

    def _generator(self, *key: int) -> torch.Generator:
        seed = np.random.SeedSequence([self.seed, self.num_labeled, *key]).generate_state(1)[0]
        return torch.Generator().manual_seed(int(seed))

    def train_dataloader(self) -> DataLoader:
        """Shuffled batches of the labeled items, as labeled when this is called, reshuffled every epoch.

        The order of an epoch is a function of (seed, labeled count, epoch within the round) alone, drawn when the
        epoch starts iterating. Handing the DataLoader a generator instead would let every ``iter()`` call draw
        from it, and Lightning creates iterators a different number of times on a resumed run, so a resume would
        not replay the uninterrupted run's batches. Under DDP, Lightning's distributed sampler deals this order
        out across ranks without reshuffling it.
        """
        # The loader still gets its own generator, for the base seed that every iter() draws (worker seeds), so
        # that iterating never consumes the global RNG.
        assert self.labels is not None
        return DataLoader(
            _WithLabels(self._require_train_dataset(), self.labels),
            batch_size=self.batch_size,
            sampler=_EpochShuffle(self, self.labeled_indices),
            drop_last=False,
            num_workers=self.num_workers,
            generator=self._generator(),
        )

    @property
    def val_dataloader(self) -> Callable[[], DataLoader] | None:  # type: ignore[override]
        """The validation loader factory, or ``None`` without a ``val_dataset``.

        Lightning runs validation only when ``val_dataloader`` is overridden, which it checks with ``getattr``:
        ``None`` reads as "not overridden", so a fit without a validation set skips the loop cleanly, instead of
        warning on every reload about an empty loader (what returning ``[]`` does in Lightning 2.6).
        """
        return self._val_dataloader if self.val_dataset is not None else None

    def _val_dataloader(self) -> DataLoader:
        if self.val_dataset is None:
            raise ValueError("no val_dataset: val_dataloader is None without one")
        return self._eval_loader(self.val_dataset)

    def test_dataloader(self) -> DataLoader:
        """The test set in order, ``eval_batch_size`` per batch.

        Raises:
            ValueError: without a test set.
        """
        if self.test_dataset is None:
            raise ValueError(f"{type(self).__name__} has no test_dataset to evaluate on")
        return self._eval_loader(self.test_dataset)

    def pool_dataloader(self, indices: torch.Tensor) -> DataLoader:
        """The un-augmented items at ``indices`` of the training set, in that order (for scoring).

        Raises:
            ValueError: for indices that are not a 1-D integer sequence in range.
        """
        if self.pool_dataset is None:
            raise RuntimeError(f"{type(self).__name__} has no pool dataset yet: call setup() first")
        index = _as_index_tensor(indices, dataset_length(self.pool_dataset), "pool_dataloader()")
        assert self.labels is not None
        return self._eval_loader(Subset(_WithLabels(self.pool_dataset, self.labels), index.tolist()))

    def _eval_loader(self, dataset: Dataset) -> DataLoader:
        return DataLoader(dataset, batch_size=self.eval_batch_size, shuffle=False, num_workers=self.num_workers)


class _EpochShuffle(Sampler[int]):
    """The given labeled indices, in the order of the data module's current epoch (drawn at ``iter()`` time)."""

    def __init__(self, datamodule: ActiveDataModule, labeled: torch.Tensor) -> None:
        self._datamodule = datamodule
        self._labeled = labeled

    def __len__(self) -> int:
        return len(self._labeled)

    def __iter__(self) -> Iterator[int]:
        # The round's epochs are counted here, where an epoch really starts: Lightning also builds loaders it
        # does not iterate (on a resume, for the epoch the checkpoint finished).
        datamodule = self._datamodule
        order = torch.randperm(len(self._labeled), generator=datamodule._generator(datamodule._epoch_in_round()))
        return iter(self._labeled[order].tolist())


def _input_of(item: Any) -> Any:
    """The input of a dataset item: the first element of an ``(input, target, ...)`` tuple, or the item itself."""
    return item[0] if isinstance(item, (tuple, list)) else item


class _WithLabels(Dataset):
    """Items of ``dataset`` as ``(input, label)`` with the data module's labels (-1 where none is known yet).

    Training then uses the labels that were given, whoever gave them, and a dataset of inputs only works too.
    ``labels`` is the data module's own tensor (updated in place by ``label()``), not a copy.
    """

    def __init__(self, dataset: Dataset, labels: torch.Tensor) -> None:
        self.dataset = dataset
        self.labels = labels

    def __len__(self) -> int:
        return dataset_length(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, torch.Tensor]:
        return _input_of(self.dataset[index]), self.labels[index]
