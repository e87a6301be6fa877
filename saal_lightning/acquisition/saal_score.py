"""The SAAL acquisition score as a pure function (Kim et al., ICML 2023, eq. 6).

For every input x_i, with pseudo label yhat_i = argmax f_theta(x_i) and g_i the gradient of CE(f_theta(x_i), yhat_i)
with respect to all trainable parameters *of that one item*:

* ``adaptive=False`` (the paper, eq. 3 with p = 2): eps_i = rho * g_i / (||g_i|| + 1e-12);
* ``adaptive=True`` (what the authors' released code computes, the ASAM ball):
  eps_i = rho * w^2 * g_i / (|| |w| * g_i || + 1e-12);

and the score is CE(f_{theta+eps_i}(x_i), yhat_i) (``mode="max"``) or that minus the clean loss (``mode="diff"``).
The model is scored in eval mode (BatchNorm uses its running statistics, so items do not interact) and is left
exactly as it was, also when the call raises (a layer failing, a kernel running out of memory, Ctrl-C): training
flags, modules and their attributes, parameters, buffers, ``.grad``, ``requires_grad`` and hooks are as before.
(During the call the hook engine swaps layers' ``forward`` temporarily, so do not use the same model from another
thread meanwhile.)

Methods (``method=``):

* ``"hooks"`` (exact, fast): one batched forward and backward records each layer's inputs A_i and output
  gradients B_i; the per-sample gradient of a layer is B_i^T A_i. Fast layers: ``nn.Linear`` (on [batch, features]
  or [batch, tokens, features]), ``nn.Conv2d`` (``groups=1``, zero padding given as numbers), ``nn.Embedding``
  (with ``padding_idx``; not ``max_norm`` or ``scale_grad_by_freq``), BatchNorm (1d/2d/3d, eval mode with running
  statistics), ``nn.LayerNorm`` and ``nn.GroupNorm``, each without parametrizations, shared parameters or an
  overridden ``forward``; any module without trainable parameters (activations, pooling, dropout, flatten,
  attention as matmul + softmax, containers) may sit between them, so a BERT-style encoder takes this path.
  Plain ball: each layer
  either takes its per-sample gradient norm as a "ghost norm" <A_i A_i^T, B_i B_i^T> and perturbs its output by
  the low-rank term c_i B_i^T (A_i a'_i), or materialises its per-sample gradient where that is cheaper (many
  positions T, e.g. a ResNet's first stages). Adaptive ball: w^2 * g has no low-rank form, so conv layers
  materialise their per-sample gradients, the wide ones in cache-sized groups, recomputed in the perturbed pass
  instead of kept; single-position layers (a linear head) use a rank-1 closed form. The perturbed pass is the
  model's own batched forward with each known layer's ``forward`` swapped, for the duration of the call, for one
  that applies item i's perturbed weights to that layer's (perturbed) input. Assumes each item's output depends
  on that item only, which holds for eval-mode networks of these layers. See
  :mod:`saal_lightning.acquisition.per_sample_hooks`.
* ``"vmap"`` (exact, any model): ``torch.func`` per-sample gradients and per-sample weights; about 8 bytes per
  parameter per item, and grouped convolutions in the perturbed forward.
* ``"auto"`` (default): ``"hooks"`` when the model qualifies, else ``"vmap"`` with a warning that says what the
  fallback was measured to cost; also ``"vmap"`` when the hook engine finds while running the model that it cannot
  take per-item gradients from it (a layer input not batched along dim 0, or changed in place).
* ``"first_order"`` (APPROXIMATION): loss + rho * ||g|| (adaptive: loss + rho * || |w| * g ||), the first-order
  Taylor value of the perturbed loss; no perturbed forward.
* ``"last_layer"`` (APPROXIMATION): only the last ``nn.Linear`` (the classifier head, whose output must be the
  model's output) is perturbed, with the step taken from the head's own gradient; closed form, one forward.

Example::

    >>> from saal_lightning.models.backbones import build_backbone
    >>> model = build_backbone("small_cnn", num_classes=10, in_channels=1)
    >>> saal_scores(model, torch.randn(8, 1, 28, 28), rho=0.05).shape
    torch.Size([8])
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Literal, get_args

import torch
from torch import nn

from saal_lightning.acquisition.per_sample_hooks import (
    HooksUnsupported,
    Scratch,
    hooks_bytes_per_sample,
    hooks_losses,
    hooks_norms,
    hooks_problems,
)
from saal_lightning.acquisition.per_sample_vmap import vmap_bytes_per_sample, vmap_losses, vmap_norms
from saal_lightning.acquisition.scoring_approximations import last_layer_bytes_per_sample, last_layer_losses
from saal_lightning.acquisition.scoring_common import check_model_and_inputs
from saal_lightning.option_checks import check_choice, check_int

if TYPE_CHECKING:
    from rich.progress import Progress

ExactMethod = Literal["auto", "hooks", "vmap"]
ApproximateMethod = Literal["first_order", "last_layer"]
Method = Literal[ExactMethod, ApproximateMethod]
Mode = Literal["max", "diff"]
EXACT_METHODS: tuple[str, ...] = get_args(ExactMethod)
APPROXIMATE_METHODS: tuple[str, ...] = get_args(ApproximateMethod)
MODES: tuple[str, ...] = get_args(Mode)
# Working-memory budget when neither chunk_size nor max_memory is given. Measured on CPU: ResNet-18 on 2,000
# CIFAR-sized items (3x32x32) raised the peak RSS by 0.85 GiB (plain ball) and 0.9 GiB (adaptive), well inside
# the ~4 GiB the project allows; bigger chunks did not score faster.
DEFAULT_MAX_MEMORY = 1 << 30
# Upper bound on the derived chunk size: on CPU, chunks of 128-512 items scored the small CNN ~1.5x faster than
# chunks of 1,000+ (whose activations are page-faulted in afresh on every call), and ResNet-18 gained nothing past
# ~32 items.
MAX_DERIVED_CHUNK = 256

LossFn = Callable[[nn.Module, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
NormFn = Callable[[nn.Module, torch.Tensor, bool], tuple[torch.Tensor, torch.Tensor]]
MemoryFn = Callable[..., int]  # (model, probe, adaptive=...) -> bytes per item

# What the fallback costs, measured with benchmarks/acquisition.py on the 2-core CPU VM in float32, as time per item of
# method="vmap" over method="hooks": ResNet-18, 256 items at 28 px (README table, 2026-11-25): 52.6 / 14.4 ms (plain
# ball) and 63.5 / 28.5 ms (adaptive), where the fallback was slower than the one-item-at-a-time loop (0.79x);
# small CNN (same table): 0.19 / 0.18 and 0.20 / 0.16 ms; the tiny BERT-style encoder of benchmarks/bert_like.py
# (2 layers, width 64, 32 tokens, 256 items; 2026-12-01, best of 5 interleaved runs on the shared VM): 2.62 / 2.30 ms
# (plain) and 2.96 / 2.57 ms (adaptive), and 4.94 / 5.00 and 5.14 / 3.80 ms while the VM was more loaded. (A real
# Hugging Face BertForSequenceClassification cannot take the fallback at all: vmap refuses the data-dependent
# branches of its mask helpers, transformers 5.24.)
FALLBACK_MEASURED = ("measured 2.2-3.7x the hook engine's time per item on ResNet-18, where it was slower than scoring "
                     "one item at a time, and 1.0-1.4x on a small CNN and a tiny BERT-style encoder (CPU, "
                     "benchmarks/acquisition.py)")


@dataclass(frozen=True)
class _Engine:
    """``losses(model, x) -> (clean, perturbed)`` for one chunk, its working memory per item, and the engine to
    switch to when this one finds at run time that it cannot score the model (``None``: raise)."""

    losses: LossFn
    bytes_per_sample: Callable[[nn.Module, torch.Tensor], int]
    fallback: Callable[[], _Engine] | None = None


def _first_order(norms: NormFn, model: nn.Module, x: torch.Tensor, rho: float,
                 adaptive: bool) -> tuple[torch.Tensor, torch.Tensor]:
    clean, norm = norms(model, x, adaptive)
    return clean, clean + rho * norm


def _warn_fallback(reason: str, stacklevel: int) -> None:
    # Once per distinct message (Python's default warning filter).
    warnings.warn(f"saal_scores: the fast hook engine cannot score this model ({reason}), so it uses the torch.func "
                  f"(vmap) engine: exact, but {FALLBACK_MEASURED}. Known layers: nn.Linear, nn.Conv2d, nn.Embedding, "
                  "BatchNorm, nn.LayerNorm, nn.GroupNorm.", stacklevel=stacklevel + 1)


def _engine(method: str, norms: NormFn, losses: Callable[..., tuple[torch.Tensor, torch.Tensor]], memory: MemoryFn,
            rho: float, adaptive: bool, fallback: Callable[[], _Engine] | None = None) -> _Engine:
    if method == "first_order":
        return _Engine(partial(_first_order, norms, rho=rho, adaptive=adaptive), partial(memory, adaptive=adaptive),
                       fallback)
    return _Engine(partial(losses, rho=rho, adaptive=adaptive), partial(memory, adaptive=adaptive), fallback)


def _select_engine(method: str, model: nn.Module, rho: float, adaptive: bool) -> _Engine:
    if method == "last_layer":
        return _Engine(partial(last_layer_losses, rho=rho, adaptive=adaptive), last_layer_bytes_per_sample)
    problems = [] if method == "vmap" else hooks_problems(model)
    if method == "hooks" and problems:
        raise ValueError("method='hooks' cannot score this model: " + "; ".join(problems)
                         + ". Use method='vmap' (or 'auto', which falls back to it).")
    vmap = partial(_engine, method, vmap_norms, vmap_losses, vmap_bytes_per_sample, rho, adaptive)
    if problems:
        _warn_fallback("; ".join(problems), stacklevel=3)
    if method == "vmap" or problems:
        return vmap()
    scratch = Scratch()  # one set of buffers for all chunks
    return _engine(method, partial(hooks_norms, scratch=scratch), partial(hooks_losses, scratch=scratch),
                   hooks_bytes_per_sample, rho, adaptive, fallback=None if method == "hooks" else vmap)


def validate_scoring_options(rho: object, adaptive: object, mode: object, chunk_size: object, method: object,
                             max_memory: object = None) -> None:
    """Raise ``ValueError`` for an invalid option of :func:`saal_scores` (also checked where a strategy is built)."""
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not math.isfinite(rho) or rho <= 0:
        raise ValueError(f"rho must be positive and finite, got {rho!r}")
    if not isinstance(adaptive, bool):
        raise ValueError(f"adaptive must be True or False, got {adaptive!r}")
    check_choice("mode", mode, MODES)
    check_choice("method", method, EXACT_METHODS + APPROXIMATE_METHODS)
    check_int("chunk_size", chunk_size, minimum=1, allow_none=True)
    check_int("max_memory", max_memory, minimum=1, allow_none=True)
    if chunk_size is not None and max_memory is not None:
        raise ValueError("give chunk_size or max_memory, not both (max_memory only picks the chunk size)")


def _validate(model: object, inputs: object, rho: object, adaptive: object, mode: object, chunk_size: object,
              method: object, max_memory: object) -> None:
    model, inputs = check_model_and_inputs(model, inputs)
    validate_scoring_options(rho, adaptive, mode, chunk_size, method, max_memory)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("the model has no trainable parameters to perturb")


class _Progress:
    """``advance(n)`` and ``reset()`` of a rich progress bar, or nothing when disabled."""

    def __init__(self, bar: Progress | None, total: int) -> None:
        self.bar = bar
        self.task = None if bar is None else bar.add_task("SAAL scores", total=total)

    def advance(self, n: int) -> None:
        if self.bar is not None and self.task is not None:
            self.bar.advance(self.task, n)

    def reset(self) -> None:
        if self.bar is not None and self.task is not None:
            self.bar.reset(self.task)


@contextmanager
def _progress_bar(enabled: bool, total: int) -> Iterator[_Progress]:
    """Yield a :class:`_Progress`; draws a rich progress bar only when enabled."""
    if not enabled:
        yield _Progress(None, total)
        return
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        yield _Progress(bar, total)


def _as_autograd_input(x: torch.Tensor) -> torch.Tensor:
    # Tensors made under torch.inference_mode (e.g. in a Lightning predict loop) cannot enter autograd.
    return x.clone() if x.is_inference() else x


def saal_scores(
    model: nn.Module,
    inputs: torch.Tensor,
    rho: float = 0.05,
    adaptive: bool = False,
    mode: Mode = "max",
    chunk_size: int | None = None,
    *,
    method: Method = "auto",
    max_memory: int | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """One SAAL score per input (dim 0), as a 1-D tensor on the inputs' device.

    Args:
        model: any module whose forward maps ``inputs`` to logits ``[batch, classes]``, on the inputs' device.
        inputs: the items to score, batched along dim 0.
        rho: radius of the perturbation ball.
        adaptive: ``False``: the paper's ball, eps = rho g/||g||; ``True``: the authors' code (ASAM),
            eps = rho w^2 g / || |w| g ||.
        mode: ``"max"``: the perturbed loss; ``"diff"``: perturbed minus clean loss.
        chunk_size: items processed at once; ``None`` derives it from ``max_memory`` (at most 256).
        method: ``"auto"``, ``"hooks"`` or ``"vmap"`` (exact), or ``"first_order"`` / ``"last_layer"``
            (approximations); see the module docstring.
        max_memory: working-memory budget in bytes used to pick the chunk size (default 1 GiB); an estimate
            from the model's shapes, not a hard cap.
        progress: show a rich progress bar over the items.

    Raises:
        ValueError: for a bad argument, a model without trainable parameters or non-logit outputs, or
            ``method="hooks"`` on a model that the hook engine cannot score.
        HooksUnsupported: (a ``RuntimeError``) with ``method="hooks"``, if the hook engine finds while running the
            model that it cannot take per-item gradients from it (a layer input changed in place after the layer
            ran, or not batched along dim 0); ``"auto"`` falls back to ``"vmap"`` instead.
    """
    _validate(model, inputs, rho, adaptive, mode, chunk_size, method, max_memory)
    training_flags = {module: module.training for module in model.modules()}
    try:
        model.eval()
        with torch.inference_mode(False), _progress_bar(progress, len(inputs)) as bar:
            engine = _select_engine(method, model, float(rho), adaptive)
            while True:
                try:
                    scores = _score_chunks(engine, model, inputs, mode, chunk_size, max_memory, bar)
                    break
                except HooksUnsupported as error:
                    # Raised before any layer state is used, with the model restored: start over with the fallback.
                    if engine.fallback is None:
                        raise
                    _warn_fallback(str(error), stacklevel=2)
                    engine = engine.fallback()
                    bar.reset()
        return torch.cat(scores).to(inputs.device)
    finally:
        for module, flag in training_flags.items():
            module.training = flag


def _score_chunks(engine: _Engine, model: nn.Module, inputs: torch.Tensor, mode: str, chunk_size: int | None,
                  max_memory: int | None, bar: _Progress) -> list[torch.Tensor]:
    if chunk_size is None:
        budget = DEFAULT_MAX_MEMORY if max_memory is None else max_memory
        per_item = engine.bytes_per_sample(model, _as_autograd_input(inputs[:1]))
        chunk_size = max(1, min(len(inputs), MAX_DERIVED_CHUNK, budget // max(1, per_item)))
    scores = []
    for start in range(0, len(inputs), chunk_size):
        x = _as_autograd_input(inputs[start : start + chunk_size])
        clean, perturbed = engine.losses(model, x)
        scores.append((perturbed - clean if mode == "diff" else perturbed).detach())
        bar.advance(len(x))
    return scores
