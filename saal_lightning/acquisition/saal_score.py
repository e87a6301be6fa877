"""The SAAL acquisition score as a pure function (Kim et al., ICML 2023, eq. 6).

For every input x_i, with pseudo label yhat_i = argmax f_theta(x_i) and g_i the gradient of CE(f_theta(x_i), yhat_i)
with respect to all trainable parameters *of that one item*:

* ``adaptive=False`` (the paper, eq. 3 with p = 2): eps_i = rho * g_i / (||g_i|| + 1e-12);
* ``adaptive=True`` (what the authors' released code computes, the ASAM ball):
  eps_i = rho * w^2 * g_i / (|| |w| * g_i || + 1e-12);

and the score is CE(f_{theta+eps_i}(x_i), yhat_i) (``mode="max"``) or that minus the clean loss (``mode="diff"``).
The model is scored in eval mode (BatchNorm uses its running statistics, so items do not interact) and is left
exactly as it was: training flags, parameters, buffers and ``.grad`` are untouched. (During the call the hook
engine swaps layers' ``forward`` temporarily, so do not use the same model from another thread meanwhile.)

Methods (``method=``):

* ``"hooks"`` (exact, fast): one batched forward and backward records each layer's inputs A_i and output
  gradients B_i; the per-sample gradient of a layer is B_i^T A_i. Fast layers: ``nn.Linear``, ``nn.Conv2d``
  (``groups=1``, zero padding given as numbers), BatchNorm (1d/2d/3d, eval mode with running statistics),
  ``nn.LayerNorm`` and ``nn.GroupNorm``, each without parametrizations, shared parameters or an overridden
  ``forward``; any module without trainable parameters (activations, pooling, dropout, flatten, containers) may
  sit between them. Plain ball: each layer
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
* ``"auto"`` (default): ``"hooks"`` when the model qualifies, else ``"vmap"``.
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

import torch
from torch import nn

from saal_lightning.acquisition.per_sample_hooks import (
    Scratch,
    hooks_bytes_per_sample,
    hooks_losses,
    hooks_norms,
    hooks_problems,
)
from saal_lightning.acquisition.per_sample_vmap import vmap_bytes_per_sample, vmap_losses, vmap_norms
from saal_lightning.acquisition.scoring_approximations import last_layer_bytes_per_sample, last_layer_losses

EXACT_METHODS = ("auto", "hooks", "vmap")
APPROXIMATE_METHODS = ("first_order", "last_layer")
MODES = ("max", "diff")
# Working-memory budget when neither chunk_size nor max_memory is given. Measured on CPU: ResNet-18 on 2,000
# CIFAR-sized items (3x32x32) raised the peak RSS by 0.85 GiB (plain ball) and 0.9 GiB (adaptive), well inside
# the ~4 GiB the project allows; bigger chunks did not score faster.
DEFAULT_MAX_MEMORY = 1 << 30
# Upper bound on the derived chunk size: on CPU, chunks of 128-512 items scored the small CNN ~1.5x faster than
# chunks of 1,000+ (whose activations are page-faulted in afresh on every call), and ResNet-18 gained nothing past
# ~32 items.
MAX_DERIVED_CHUNK = 256

LossFn = Callable[[nn.Module, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class _Engine:
    """``losses(model, x) -> (clean, perturbed)`` for one chunk, and its working memory per item."""

    losses: LossFn
    bytes_per_sample: Callable[[nn.Module, torch.Tensor], int]


def _first_order(norms: Callable, model: nn.Module, x: torch.Tensor, rho: float,
                 adaptive: bool) -> tuple[torch.Tensor, torch.Tensor]:
    clean, norm = norms(model, x, adaptive)
    return clean, clean + rho * norm


def _select_engine(method: str, model: nn.Module, rho: float, adaptive: bool) -> _Engine:
    if method == "last_layer":
        return _Engine(partial(last_layer_losses, rho=rho, adaptive=adaptive), last_layer_bytes_per_sample)
    problems = [] if method == "vmap" else hooks_problems(model)
    if method == "hooks" and problems:
        raise ValueError("method='hooks' cannot score this model: " + "; ".join(problems)
                         + ". Use method='vmap' (or 'auto', which falls back to it).")
    if problems:
        # Once per distinct message (Python's default warning filter): the fallback can be several times slower.
        warnings.warn("saal_scores: the fast hook engine cannot score this model (" + "; ".join(problems)
                      + "), so it uses the torch.func (vmap) engine: exact, but on CPU it can be slower than scoring "
                      "one item at a time. Known layers: nn.Linear, nn.Conv2d, BatchNorm, nn.LayerNorm, nn.GroupNorm.",
                      stacklevel=3)
    if method == "vmap" or problems:
        norms, losses, memory = vmap_norms, vmap_losses, vmap_bytes_per_sample
    else:
        scratch = Scratch()  # one set of buffers for all chunks
        norms, losses = partial(hooks_norms, scratch=scratch), partial(hooks_losses, scratch=scratch)
        memory = hooks_bytes_per_sample
    if method == "first_order":
        return _Engine(partial(_first_order, norms, rho=rho, adaptive=adaptive), partial(memory, adaptive=adaptive))
    return _Engine(partial(losses, rho=rho, adaptive=adaptive), partial(memory, adaptive=adaptive))


def validate_scoring_options(rho: object, adaptive: object, mode: object, chunk_size: object, method: object,
                             max_memory: object = None) -> None:
    """Raise ``ValueError`` for an invalid option of :func:`saal_scores` (also checked where a strategy is built)."""
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not math.isfinite(rho) or rho <= 0:
        raise ValueError(f"rho must be positive and finite, got {rho!r}")
    if not isinstance(adaptive, bool):
        raise ValueError(f"adaptive must be True or False, got {adaptive!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if method not in EXACT_METHODS + APPROXIMATE_METHODS:
        raise ValueError(f"method must be one of {EXACT_METHODS + APPROXIMATE_METHODS}, got {method!r}")
    for name, value in (("chunk_size", chunk_size), ("max_memory", max_memory)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
    if chunk_size is not None and max_memory is not None:
        raise ValueError("give chunk_size or max_memory, not both (max_memory only picks the chunk size)")


def _validate(model: object, inputs: object, rho: object, adaptive: object, mode: object, chunk_size: object,
              method: object, max_memory: object) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(inputs, torch.Tensor):
        raise TypeError(f"inputs must be a tensor, got {type(inputs).__name__}")
    if inputs.ndim == 0 or inputs.shape[0] == 0:
        raise ValueError(f"inputs must hold at least one item along dim 0, got shape {tuple(inputs.shape)}")
    validate_scoring_options(rho, adaptive, mode, chunk_size, method, max_memory)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("the model has no trainable parameters to perturb")


@contextmanager
def _progress_bar(enabled: bool, total: int) -> Iterator[Callable[[int], None]]:
    """Yield ``advance(n)``; draws a rich progress bar only when enabled."""
    if not enabled:
        yield lambda n: None
        return
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        task = bar.add_task("SAAL scores", total=total)
        yield lambda n: bar.advance(task, n)


def _as_autograd_input(x: torch.Tensor) -> torch.Tensor:
    # Tensors made under torch.inference_mode (e.g. in a Lightning predict loop) cannot enter autograd.
    return x.clone() if x.is_inference() else x


def saal_scores(
    model: nn.Module,
    inputs: torch.Tensor,
    rho: float = 0.05,
    adaptive: bool = False,
    mode: str = "max",
    chunk_size: int | None = None,
    *,
    method: str = "auto",
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
        RuntimeError: if the hook engine finds a layer's input changed in place after the layer ran (use
            ``method="vmap"``).
    """
    _validate(model, inputs, rho, adaptive, mode, chunk_size, method, max_memory)
    training_flags = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.inference_mode(False):
            engine = _select_engine(method, model, float(rho), adaptive)
            if chunk_size is None:
                budget = DEFAULT_MAX_MEMORY if max_memory is None else max_memory
                per_item = engine.bytes_per_sample(model, _as_autograd_input(inputs[:1]))
                chunk_size = max(1, min(len(inputs), MAX_DERIVED_CHUNK, budget // max(1, per_item)))
            scores = []
            with _progress_bar(progress, len(inputs)) as advance:
                for start in range(0, len(inputs), chunk_size):
                    x = _as_autograd_input(inputs[start : start + chunk_size])
                    clean, perturbed = engine.losses(model, x)
                    scores.append((perturbed - clean if mode == "diff" else perturbed).detach())
                    advance(len(x))
        return torch.cat(scores).to(inputs.device)
    finally:
        for module, flag in training_flags.items():
            module.training = flag
