r"""
Sharpness Diagnostics
^^^^^^^^^^^^^^^^^^^^^

Logs the SAAL paper's diagnostics (Kim et al., ICML 2023) for every round of an
:class:`~saal_lightning.callbacks.AcquisitionCallback` run, to ``<run dir>/diagnostics.csv`` (one row per round),
``<run dir>/diagnostics_items.csv`` (one row per acquired item) and the trainer's loggers (``diagnostics/<column>``).

Round ``r``'s row describes the model trained in round ``r`` and the split it trained on: the labeled set
X_L = the items labeled in rounds 0..r and the unlabeled set X_U = the rest (including the items round ``r``'s
acquisition is about to label). On a seeded sample of each (``sample_size`` items, the paper's 2,000; drawn anew
every round as a function of ``seed`` and ``r`` only):

* Figure 3: ``labeled_perturbed_loss``, ``unlabeled_perturbed_loss``: the mean maximally perturbed loss with the
  **true** labels (each item's own SAM ascent step for its true label, ``rho``/``adaptive`` ball), and
  ``union_perturbed_loss`` = (|X_L| m_L + |X_U| m_U) / (|X_L| + |X_U|), the paper's eq. 5 weighting by the full sets'
  sizes;
* Figure 4: ``prediction_kept_fraction`` ψ(ρ) and ``mean_margin`` (the mean δ_x of Theorem 3.1) of the unlabeled
  sample under each item's own pseudo-label perturbation, and ``relative_margin`` r(ρ) = mean δ_x / (perturbed
  true-label loss);
* Figure 1: for the items round ``r`` acquired (all of them, not a sample), the SAAL score (pseudo labels, this
  callback's ball) and Theorem 3.3's terms for the pseudo-label loss, as the theorem states them (plain ball):
  loss, ρ‖∇l‖ and ½ρ²λ₁ with λ₁ each item's top Hessian eigenvalue (Lanczos, ``hessian_iterations`` products);
  their means, and the Spearman correlation of the score with each term and with their sum.

With people as the oracle (``datamodule.oracle == "human"``) the unlabeled items' true labels are unknown:
``unlabeled_perturbed_loss``, ``union_perturbed_loss`` and ``relative_margin`` are left empty (said once, in the
log). ψ and δ_x need no true label (they are defined with the pseudo label), and the labeled set's labels are the
ones people gave; the acquired items are then the round's query.

**Order.** The diagnostics of a round need that round's acquisition done and the model not yet trained further. This
callback reads the acquisition callback's public ``history`` (the round, its ``global_step``) and the data module's
split (``labeled_round``: which round labeled each item); it computes round ``r`` at the first of its hooks that
runs after the acquisition callback recorded ``r`` with no training step since: ``on_train_epoch_end`` (rounds
inside one fit), ``on_train_end`` (one round per fit) or ``on_train_start`` (a resume whose checkpoint predates
the round's diagnostics). Lightning calls callbacks in list order, so at ``setup`` this callback moves itself
right behind the acquisition callback when it was listed before it (an info log says so).

**Cost.** Three perturbation passes over the samples (``torch.func``: exact for any model, about 8 bytes per
parameter per item of a chunk) plus up to ``hessian_iterations`` Hessian-vector products per acquired item.
Measured 2026-12-01 on the 2-core development VM while it ran other jobs (load average about 7), ``saal fit`` with
``configs/quickstart.yaml`` (``small_cnn``, real Fashion-MNIST, 2,000-item samples, 40 acquired items): 14-19 s per
round; one pass over 2,000 items took 7 s there, against 4 s for the acquisition's own SAAL scores (hook engine).
Lower ``sample_size`` or raise ``every_n_rounds`` for long CPU runs.

**Files** are rewritten whole and atomically from the callback's rows on rank 0 (which alone computes); the rows
are the callback's checkpointed state, so a resumed run rewrites the files from the checkpoint's rows and never
duplicates a round.

With ``saal fit``: ``--trainer.callbacks+=saal_lightning.callbacks.sharpness_diagnostics.SharpnessDiagnostics
--trainer.callbacks.sample_size=500``. ``notebooks/sharpness_figures.ipynb`` draws the figures from the files.

Example::

    >>> from saal_lightning import AcquisitionCallback
    >>> diagnostics = SharpnessDiagnostics(sample_size=500, rho=0.05, adaptive=True)
    >>> callbacks = [AcquisitionCallback("saal", num_rounds=3, epochs_per_round=5), diagnostics]
"""

from __future__ import annotations

import csv
import io
import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.seed import isolate_rng
from torch import nn
from typing_extensions import override

from saal_lightning.acquisition.saal_score import saal_scores, validate_scoring_options
from saal_lightning.callbacks.acquisition_callback import AcquisitionCallback
from saal_lightning.callbacks.people_oracle import asks_people
from saal_lightning.diagnostics import bound_terms, perturb, relative_margin, spearman_correlation
from saal_lightning.reporting.atomic_file import atomic_write_text

log = logging.getLogger(__name__)

DIAGNOSTIC_COLUMNS = (
    "round",
    "num_labeled",
    "num_unlabeled",
    "labeled_sample",
    "unlabeled_sample",
    "rho",
    "adaptive",
    # Figure 3: the mean maximally perturbed loss with the true labels.
    "labeled_perturbed_loss",
    "unlabeled_perturbed_loss",
    "union_perturbed_loss",
    # Figure 4: under each unlabeled item's own pseudo-label perturbation.
    "prediction_kept_fraction",
    "mean_margin",
    "relative_margin",
    # Figure 1: the acquired items' SAAL scores and Theorem 3.3's terms (means), and their rank correlations.
    "num_acquired",
    "acquired_score",
    "acquired_loss",
    "acquired_gradient_term",
    "acquired_curvature_term",
    "acquired_top_eigenvalue",
    "spearman_loss",
    "spearman_gradient_term",
    "spearman_curvature_term",
    "spearman_bound",
    "seconds",
)
ITEM_COLUMNS = ("round", "index", "score", "loss", "gradient_norm", "top_eigenvalue", "gradient_term",
                "curvature_term")


def _mean(values: torch.Tensor) -> float | str:
    return float(values.double().mean()) if len(values) else ""


def round_diagnostics(
    model: nn.Module,
    labeled: tuple[torch.Tensor, torch.Tensor],
    unlabeled: tuple[torch.Tensor, torch.Tensor | None],
    acquired: torch.Tensor | None,
    num_labeled: int,
    num_unlabeled: int,
    rho: float = 0.05,
    adaptive: bool = True,
    hessian_iterations: int = 20,
    hessian_tolerance: float = 1e-3,
    generator: torch.Generator | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One round's row (without ``round`` and ``seconds``) and the acquired items' rows (without ``round``, ``index``).

    Args:
        model: the round's trained model (left as it was).
        labeled: a sample of the labeled set, ``(inputs, labels)``.
        unlabeled: a sample of the unlabeled set, ``(inputs, true labels or None when unknown)``.
        acquired: the inputs of the items the round acquired, or ``None``.
        num_labeled, num_unlabeled: the sizes of the whole sets (the union's weights).
        rho, adaptive: the perturbation ball of the perturbed losses, ψ, δ and the SAAL score.
        hessian_iterations, hessian_tolerance, generator: :func:`~saal_lightning.diagnostics.top_hessian_eigenvalue`'s.
    """
    row: dict[str, Any] = {column: "" for column in DIAGNOSTIC_COLUMNS if column not in ("round", "seconds")}
    x_labeled, y_labeled = labeled
    x_unlabeled, y_unlabeled = unlabeled
    row.update(num_labeled=num_labeled, num_unlabeled=num_unlabeled, labeled_sample=len(x_labeled),
               unlabeled_sample=len(x_unlabeled), rho=rho, adaptive=adaptive, num_acquired=0)
    labeled_mean = _mean(perturb(model, x_labeled, y_labeled, rho, adaptive).perturbed_loss) if len(x_labeled) else ""
    row["labeled_perturbed_loss"] = labeled_mean
    if len(x_unlabeled):
        own = perturb(model, x_unlabeled, None, rho, adaptive)
        row["prediction_kept_fraction"] = own.kept_fraction
        row["mean_margin"] = _mean(own.margins)
        if y_unlabeled is not None:
            true_losses = perturb(model, x_unlabeled, y_unlabeled, rho, adaptive).perturbed_loss
            unlabeled_mean = float(true_losses.double().mean())
            row["unlabeled_perturbed_loss"] = unlabeled_mean
            row["relative_margin"] = relative_margin(own.margins, true_losses)
            if labeled_mean != "":
                weighted = num_labeled * float(labeled_mean) + num_unlabeled * unlabeled_mean
                row["union_perturbed_loss"] = weighted / (num_labeled + num_unlabeled)
    items: list[dict[str, Any]] = []
    if acquired is not None and len(acquired):
        scores = saal_scores(model, acquired, rho=rho, adaptive=adaptive)
        terms = bound_terms(model, acquired, None, rho, iterations=hessian_iterations, tolerance=hessian_tolerance,
                            generator=generator)
        named = {"loss": terms.loss, "gradient_term": terms.gradient_term, "curvature_term": terms.curvature_term,
                 "bound": terms.bound}
        row.update(num_acquired=len(acquired), acquired_score=_mean(scores), acquired_loss=_mean(terms.loss),
                   acquired_gradient_term=_mean(terms.gradient_term),
                   acquired_curvature_term=_mean(terms.curvature_term),
                   acquired_top_eigenvalue=_mean(terms.top_eigenvalue))
        for name, values in named.items():
            # Rounded: a perfect rank agreement reads 1.0, not 0.9999999999999998.
            row[f"spearman_{name}"] = round(spearman_correlation(scores, values), 12)
        items = [{"score": float(scores[i]), "loss": float(terms.loss[i]),
                  "gradient_norm": float(terms.gradient_norm[i]), "top_eigenvalue": float(terms.top_eigenvalue[i]),
                  "gradient_term": float(terms.gradient_term[i]), "curvature_term": float(terms.curvature_term[i])}
                 for i in range(len(acquired))]
    return row, items


def _csv_text(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({column: _cell(row.get(column, "")) for column in columns})
    return buffer.getvalue()


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else repr(value)
    return value


class SharpnessDiagnostics(Callback):
    r"""Log the paper's sharpness diagnostics (Figures 1, 3, 4) every round of an acquisition run.

    Needs an :class:`~saal_lightning.callbacks.AcquisitionCallback` in the same trainer (either round schedule);
    see the module docstring for what each column means and when a round is computed.

    Args:
        sample_size: items sampled from the labeled and from the unlabeled set every round (the paper: 2,000);
            ``None`` takes every item.
        rho: radius of the perturbation ball (as the SAAL strategy's).
        adaptive: ``True``: the authors' ASAM ball (the shipped configs' acquisition); ``False``: the paper's ball.
        seed: seeds the samples and the Lanczos start vectors; round ``r``'s depend on ``(seed, r)`` only.
        hessian_iterations: Hessian-vector products per acquired item for λ₁ (at most; Lanczos stops early once
            converged).
        hessian_tolerance: relative residual at which λ₁ has converged.
        every_n_rounds: compute rounds ``0, n, 2n, ...`` only (the others get no row).
        output_dir: where the files go; defaults to the acquisition callback's ``output_dir``, else the first fit's
            ``trainer.log_dir`` (the acquisition callback's default too).

    Raises:
        ValueError: for an invalid option.
        MisconfigurationException: at ``setup``, when the trainer has no (or more than one) AcquisitionCallback.
    """

    def __init__(
        self,
        sample_size: int | None = 2000,
        rho: float = 0.05,
        adaptive: bool = True,
        seed: int = 0,
        hessian_iterations: int = 20,
        hessian_tolerance: float = 1e-3,
        every_n_rounds: int = 1,
        output_dir: str | None = None,
    ) -> None:
        for name, value, least in (("sample_size", sample_size, 1), ("hessian_iterations", hessian_iterations, 1),
                                   ("every_n_rounds", every_n_rounds, 1), ("seed", seed, 0)):
            if name == "sample_size" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be an integer >= {least}" + (" or None" if name == "sample_size" else "")
                                 + f", got {value!r}")
        validate_scoring_options(rho, adaptive, "max", None, "auto")
        if isinstance(hessian_tolerance, bool) or not isinstance(hessian_tolerance, (int, float)) or \
                not hessian_tolerance >= 0:
            raise ValueError(f"hessian_tolerance must be a number >= 0, got {hessian_tolerance!r}")
        self.sample_size = sample_size
        self.rho = rho
        self.adaptive = adaptive
        self.seed = seed
        self.hessian_iterations = hessian_iterations
        self.hessian_tolerance = hessian_tolerance
        self.every_n_rounds = every_n_rounds
        self.output_dir = output_dir
        self.rows: list[dict[str, Any]] = []
        self.item_rows: list[dict[str, Any]] = []
        self._folder: Path | None = None
        self._acquisition: AcquisitionCallback | None = None
        # len(acquisition.history) at this fit's last training batch: a round recorded after it is still the model's.
        self._history_at_last_batch: int | None = None
        self._told_about_people = False
        self._skipped: set[int] = set()

    # ------------------------------------------------------------------ where the files go
    @property
    def csv_path(self) -> Path | None:
        """``diagnostics.csv`` (known from the first fit's ``setup`` on)."""
        return self._folder / "diagnostics.csv" if self._folder is not None else None

    @property
    def items_csv_path(self) -> Path | None:
        """``diagnostics_items.csv``: one row per acquired item (round, training-set index, score and terms)."""
        return self._folder / "diagnostics_items.csv" if self._folder is not None else None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        found = [c for c in trainer.callbacks if isinstance(c, AcquisitionCallback)]  # type: ignore[attr-defined]
        if len(found) != 1:
            raise MisconfigurationException(
                f"SharpnessDiagnostics needs exactly one AcquisitionCallback in the trainer's callbacks, found "
                f"{len(found)}: it describes that callback's rounds."
            )
        self._acquisition = found[0]
        callbacks = list(trainer.callbacks)  # type: ignore[attr-defined]
        if callbacks.index(self) < callbacks.index(found[0]):
            # Lightning calls callbacks in list order (and rebinds the list itself to move checkpoints last).
            callbacks.remove(self)
            callbacks.insert(callbacks.index(found[0]) + 1, self)
            trainer.callbacks = callbacks  # type: ignore[attr-defined]
            log.info("SharpnessDiagnostics moved itself behind the AcquisitionCallback: it reads each round after "
                     "the acquisition recorded it.")
        log_dir = trainer.log_dir  # broadcasts: every rank asks
        if self._folder is None:
            self._folder = Path(self.output_dir or found[0].output_dir or log_dir or trainer.default_root_dir)
        self._history_at_last_batch = None

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A resumed run's rows are the checkpoint's: the files say exactly that (a crash after writing a round's row
        # but before its checkpoint leaves a row the resumed run recomputes; an earlier run's file in the folder
        # describes another run).
        if not trainer.is_global_zero or self.csv_path is None:
            return
        on_disk = [row["round"] for row in _read_csv(self.csv_path)] if self.csv_path.exists() else None
        if on_disk is not None and on_disk != [str(row["round"]) for row in self.rows]:
            log.warning("%s holds rounds %s, this run's state has %s: rewriting it from the state.", self.csv_path,
                        on_disk, [row["round"] for row in self.rows])
            self._write()

    # ------------------------------------------------------------------ when a round is computed
    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._maybe_record(trainer, pl_module)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        assert self._acquisition is not None
        self._history_at_last_batch = len(self._acquisition.history)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._maybe_record(trainer, pl_module)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._maybe_record(trainer, pl_module)

    def _maybe_record(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Compute the acquisition's latest round if it is new here and the model has not trained since."""
        acquisition = self._acquisition
        if acquisition is None or not acquisition.history:
            return
        record = acquisition.history[-1]
        round_index = int(record["round"])
        if round_index % self.every_n_rounds or any(int(row["round"]) == round_index for row in self.rows):
            return
        trained_since = (self._history_at_last_batch is not None
                         and self._history_at_last_batch >= len(acquisition.history))
        if trained_since or int(record["global_step"]) != trainer.global_step:
            if round_index not in self._skipped:
                log.info("SharpnessDiagnostics: round %d was recorded before this callback could see its model; it "
                         "has no diagnostics.", round_index)
                self._skipped.add(round_index)
            return
        if not trainer.is_global_zero:
            return
        started = time.perf_counter()
        # Loading batches draws DataLoader base seeds from the global RNG: the training stream must not notice.
        with isolate_rng():
            row, items, indices = self._compute(trainer, pl_module, round_index)
        row = {"round": round_index, **row, "seconds": round(time.perf_counter() - started, 4)}
        self.rows.append(row)
        self.item_rows.extend({"round": round_index, "index": int(index), **item}
                              for index, item in zip(indices.tolist(), items, strict=True))
        self._write()
        metrics = {f"diagnostics/{key}": float(value) for key, value in row.items()
                   if key not in ("round", "adaptive") and isinstance(value, (int, float))
                   and math.isfinite(float(value))}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    # ------------------------------------------------------------------ the round's data
    def _compute(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                 round_index: int) -> tuple[dict[str, Any], list[dict[str, Any]], torch.Tensor]:
        datamodule = trainer.datamodule  # type: ignore[attr-defined]
        labeled_round = datamodule.state_dict()["labeled_round"]
        labeled = torch.nonzero((labeled_round >= 0) & (labeled_round <= round_index)).flatten()
        unlabeled = torch.nonzero((labeled_round < 0) | (labeled_round > round_index)).flatten()
        assert self._acquisition is not None
        pending = self._acquisition.pending_query
        acquired = (torch.as_tensor(pending).long() if pending is not None
                    else torch.nonzero(labeled_round == round_index + 1).flatten())
        generator = torch.Generator().manual_seed(
            int(np.random.SeedSequence([self.seed, round_index]).generate_state(1)[0]))
        labeled_sample, unlabeled_sample = self._sample(labeled, generator), self._sample(unlabeled, generator)
        device = pl_module.device
        x_labeled, y_labeled = _load(datamodule, labeled_sample, device)
        x_unlabeled, _ = _load(datamodule, unlabeled_sample, device)
        true_labels = None
        if asks_people(datamodule) or not hasattr(datamodule, "targets"):
            if not self._told_about_people:
                log.info("SharpnessDiagnostics: the unlabeled items' true labels are unknown (people are the "
                         "oracle), so unlabeled_perturbed_loss, union_perturbed_loss and relative_margin stay empty.")
                self._told_about_people = True
        elif len(unlabeled_sample):
            true_labels = datamodule.targets(unlabeled_sample).to(device)
        x_acquired = _load(datamodule, acquired, device)[0] if len(acquired) else None
        row, items = round_diagnostics(
            pl_module, (x_labeled, y_labeled.to(device)), (x_unlabeled, true_labels), x_acquired,
            num_labeled=len(labeled), num_unlabeled=len(unlabeled), rho=self.rho, adaptive=self.adaptive,
            hessian_iterations=self.hessian_iterations, hessian_tolerance=self.hessian_tolerance,
            generator=generator,
        )
        return row, items, acquired

    def _sample(self, indices: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.sample_size is None or len(indices) <= self.sample_size:
            return indices
        return indices[torch.randperm(len(indices), generator=generator)[: self.sample_size]].sort().values

    def _write(self) -> None:
        assert self.csv_path is not None and self.items_csv_path is not None
        atomic_write_text(self.csv_path, _csv_text(self.rows, DIAGNOSTIC_COLUMNS))
        atomic_write_text(self.items_csv_path, _csv_text(self.item_rows, ITEM_COLUMNS))

    # ------------------------------------------------------------------ checkpointing
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"rows": [dict(row) for row in self.rows], "item_rows": [dict(row) for row in self.item_rows]}

    @override
    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.rows = [dict(row) for row in state_dict.get("rows", [])]
        self.item_rows = [dict(row) for row in state_dict.get("item_rows", [])]


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _load(datamodule: Any, indices: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The un-augmented inputs and labels of the items at ``indices`` (the data module's pool loader), on device."""
    if len(indices) == 0:
        return torch.empty(0, device=device), torch.empty(0, dtype=torch.long)
    inputs, labels = [], []
    for batch in datamodule.pool_dataloader(indices):
        inputs.append(batch[0])
        labels.append(batch[1])
    return torch.cat(inputs).to(device), torch.cat(labels).long()
