"""The fast exact SAAL engine: per-sample gradients from layer hooks, and a per-sample-perturbed batched forward.

Phase 1 runs the model once, batched, with forward hooks on the known layers (``nn.Linear``, ``nn.Conv2d``,
``nn.Embedding``, eval-mode BatchNorm, ``nn.LayerNorm``, ``nn.GroupNorm``) that keep each layer's input and register a
tensor hook for its output gradient; one backward of the summed pseudo-label loss, stopped at the layers' outputs (no
weight gradients), fills those in. Items do not interact in eval mode, so item i's part of it is the gradient of its
own loss. Every linear or conv layer is seen as a matrix map: its output for item i is W A_i (+ b), with A_i the
[d, T] (unfolded) input (T positions: pixels, or the tokens of a [batch, tokens, features] input), so its per-sample
weight gradient is G_i = B_i A_i^T for the [p, T] output gradient B_i. Its part of the norm is taken one of three
ways:

* ``"ghost"`` (plain ball, few positions T): ||G_i||^2 = <A_i^T A_i, B_i^T B_i>, costing T^2 (d + p) instead of
  T p d, and nothing of size p x d is ever formed;
* ``"dense"``: G_i is materialised (plain ball where T (d + p) >= p d, e.g. the high-resolution layers of a ResNet;
  every multi-position layer for the adaptive ball, where w^2 * G_i has no low-rank form);
* ``"rank1"`` (adaptive ball, T = 1, e.g. a classifier head): || |W| * b a^T ||^2 = (b^2)^T W^2 (a^2).

An ``nn.Embedding`` is a matrix map too, of one-hot inputs: item i's gradient has one row per distinct token of the
item, the sum of B_i over the positions that looked that token up (none for ``padding_idx``, as in autograd), so its
norm and its perturbed rows come from a [T, T] same-token mask times B_i, never from a vocabulary-sized matrix.
The normalisation layers' per-sample gradients are sums of x_hat * delta and of delta over everything but the item
and the parameter's own axes (BatchNorm: x_hat from the running statistics; LayerNorm and GroupNorm: from the item's
own statistics, which a perturbed gamma or beta leaves unchanged).

Phase 2 runs the model's forward again, batched, with each known layer's ``forward`` swapped for one that applies the
weights theta + eps_i of item i to that layer's *perturbed* input A'_i (never the clean activations): ``dense``: a
batched product with the per-item weights W + eps_i, formed in cache-sized groups of items; ``ghost``: the usual
batched layer plus the low-rank term c_i B_i (A_i^T A'_i); ``rank1``: the usual layer plus c_i b_i * (W^2 (a_i *
A'_i)); embeddings: the looked-up rows plus c_i times the same-token sums; normalisation layers: a per-item scale and
shift of x_hat. The adaptive ball's wide layers (T (d + p) < p d) do not keep their per-sample gradients between the
phases; they recompute them in phase 2, group by group. Phase 1's results are only read in phase 2, so a layer's
state gives the same perturbed pass however often it is used.

A known layer called on a batch-1 input in a chunk of N items (BERT's position ids, ``[1, T]``, broadcast against
every item) is shared by all items, but each item's gradient through it differs: both phases give it the input
expanded to N, and the first chunk checks that this leaves the model's clean logits unchanged. Any other input that is
not batched along dim 0, or a layer input changed in place, raises :class:`HooksUnsupported`.

Whatever raises inside (a layer, a kernel running out of memory), the model is left as it was: hooks are removed and
swapped ``forward`` attributes deleted in ``finally`` blocks, and nothing of the model is written to.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Protocol

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import parametrize

from saal_lightning.acquisition.scoring_common import (
    DENOMINATOR_EPS,
    check_logits,
    element_size,
    hooks_registered,
    probe_leaf_calls,
)


class HooksUnsupported(RuntimeError):
    """The hook engine found, while running the model, that it cannot take per-item gradients from it (an input not
    batched along dim 0, an input changed in place); ``method="auto"`` then falls back to the ``torch.func`` engine."""


def _is_fast_affine(module: nn.Module) -> bool:
    if "forward" in vars(module):  # an instance-level forward (monkeypatched): phase 2 could not swap it safely
        return False
    if isinstance(module, nn.Linear):
        return type(module).forward is nn.Linear.forward
    if isinstance(module, nn.Conv2d):
        return (
            type(module).forward is nn.Conv2d.forward
            and type(module)._conv_forward is nn.Conv2d._conv_forward
            and module.groups == 1
            and module.padding_mode == "zeros"
            and not isinstance(module.padding, str)
        )
    return False


def _is_fast_embedding(module: nn.Module) -> bool:
    # max_norm renormalises looked-up rows of the weight in place during the forward, and scale_grad_by_freq divides
    # each row's gradient by its count in the batch: neither is a fixed linear map of the output gradient. (sparse=True
    # changes only the layout of .grad, which this engine never forms.)
    return (
        isinstance(module, nn.Embedding)
        and "forward" not in vars(module)
        and type(module).forward is nn.Embedding.forward
        and module.max_norm is None
        and not module.scale_grad_by_freq
    )


def _is_fast_batchnorm(module: nn.Module) -> bool:
    # Without running statistics an eval-mode BatchNorm normalises with batch statistics, mixing the items.
    return (
        isinstance(module, _BatchNorm)
        and "forward" not in vars(module)
        and type(module).forward is _BatchNorm.forward
        and module.running_mean is not None
        and module.running_var is not None
    )


def _is_fast_item_norm(module: nn.Module) -> bool:
    # LayerNorm and GroupNorm normalise each item with its own statistics, in train and eval mode alike.
    return (
        isinstance(module, (nn.LayerNorm, nn.GroupNorm))
        and "forward" not in vars(module)
        and type(module).forward in (nn.LayerNorm.forward, nn.GroupNorm.forward)
    )


def _is_fast(module: nn.Module) -> bool:
    return (_is_fast_affine(module) or _is_fast_embedding(module) or _is_fast_batchnorm(module)
            or _is_fast_item_norm(module))


def _fast_layers(model: nn.Module) -> list[nn.Module]:
    """The known layers that own at least one trainable parameter, in registration order."""
    return [m for m in model.modules() if _is_fast(m) and any(p.requires_grad for p in m.parameters(False))]


def hooks_problems(model: nn.Module) -> list[str]:
    """Why the hook engine cannot score ``model``; empty when it can."""
    problems = []
    if len(list(model.named_parameters(remove_duplicate=False))) != len(list(model.parameters())):
        problems.append("a parameter is shared between modules")
    for name, module in model.named_modules():
        label = f"{name or 'the model'} ({type(module).__name__})"
        own = {n for n, p in module.named_parameters(recurse=False) if p.requires_grad}
        if parametrize.is_parametrized(module):
            problems.append(f"{label} has parametrizations")
        elif isinstance(module, _BatchNorm) and not _is_fast_batchnorm(module):
            problems.append(f"{label} is a BatchNorm without running statistics or with a custom forward")
        elif own and isinstance(module, nn.Embedding) and not _is_fast_embedding(module):
            problems.append(f"{label} is an nn.Embedding with max_norm, scale_grad_by_freq or a custom forward")
        elif own and not (_is_fast(module) and own <= {"weight", "bias"}):
            problems.append(f"{label} has trainable parameters and is not a supported layer")
    return problems


def _keeps_gradients(positions: int, d: int, p: int) -> bool:
    """Whether a dense layer's per-sample gradients ([p, d] per item) are no bigger than the inputs and output
    gradients they are made from (T (d + p) per item): then they are formed once and kept for phase 2, else formed
    group by group when needed. The plain ball's ghost norm is the cheaper choice exactly when they are not."""
    return positions * (d + p) >= p * d


def _weight_kind(positions: int, d: int, p: int, adaptive: bool) -> str:
    if adaptive:
        return "rank1" if positions == 1 else "dense"
    # Fewer multiply-adds decides; it also means less memory, as dense keeps p*d and ghost keeps T*(d+p) per item.
    return "dense" if _keeps_gradients(positions, d, p) else "ghost"


# Elements of per-sample gradients formed at a time where they are not kept: on CPU a cache-sized group (4 MiB in
# float32); on accelerators, where one big kernel beats many small ones, up to 256 MiB.
_CACHE_BLOCK = 1 << 20
_DEVICE_BLOCK = 1 << 26


class Scratch:
    """Buffers reused across the layers and chunks of one scoring call, for the big per-item temporaries, and what
    the first chunk established for the others.

    A fresh multi-megabyte CPU tensor is page-faulted in on its first write at a few GB/s: on the 2-core benchmark
    machine, writing ResNet-18's [64, 512, 4608] per-sample gradients into a new tensor took 4x as long as into a
    reused one. So unfolded inputs and per-sample gradients live in buffers kept for the whole call.
    """

    def __init__(self) -> None:
        self._buffers: dict[object, torch.Tensor] = {}
        self.expansion_checked = False  # batch-1 layer inputs were shown once to leave the logits unchanged

    def get(self, key: object, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """An uninitialised tensor of ``shape`` (``like``'s dtype and device), sharing memory with earlier calls for
        the same key: a buffer must not be taken again under its key while still in use."""
        size = math.prod(shape)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < size or buffer.dtype != like.dtype or buffer.device != like.device:
            self._buffers.pop(key, None)  # let the old one go before the new one is allocated
            buffer = self._buffers[key] = like.new_empty(size)
        return buffer[:size].view(shape)


def _group_size(items: int, per_item: int, device: torch.device) -> int:
    block = _CACHE_BLOCK if device.type == "cpu" else _DEVICE_BLOCK
    return max(1, min(items, block // per_item))


def _conv_geometry(conv: nn.Conv2d) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(kernel, dilation, padding, stride), each a pair of ints (``_is_fast_affine`` refuses string padding)."""
    padding = conv.padding
    assert not isinstance(padding, str)
    return conv.kernel_size, conv.dilation, padding, conv.stride


def _unfold(x: torch.Tensor, conv: nn.Conv2d, scratch: Scratch, key: str) -> torch.Tensor:
    """``F.unfold`` for the conv's geometry, [N, C, H, W] -> [N, C*kh*kw, T], as one strided copy into ``scratch``.

    Same values as ``F.unfold``, which on CPU is 10-100x slower (2 s for 256 one-channel 28x28 images).
    """
    (kh, kw), (dh, dw), (ph, pw), (sh, sw) = _conv_geometry(conv)
    windows = F.pad(x, (pw, pw, ph, ph)).unfold(2, dh * (kh - 1) + 1, sh).unfold(3, dw * (kw - 1) + 1, sw)
    windows = windows[..., ::dh, ::dw].permute(0, 1, 4, 5, 2, 3)  # [N, C, kh, kw, OH, OW]
    n, c, _, _, oh, ow = windows.shape
    out = scratch.get(key, (n, c * kh * kw, oh * ow), x)
    out.view(windows.shape).copy_(windows)
    return out


@dataclass
class _Call:
    """One call of a known layer in phase 1: its input and output and, after backward, its output gradient.

    The input is kept for the layer's per-sample gradient and checked afterwards not to have been changed in place
    (autograd's own check does not cover the first layers, as the backward stops at their outputs). The output
    may be changed in place (an in-place ReLU): a tensor hook registered before that still receives the gradient
    of the value the layer made.
    """

    input: torch.Tensor
    input_version: int
    output: torch.Tensor | None
    output_version: int
    grad: torch.Tensor | None = None


def _store_grad(call: _Call, grad: torch.Tensor) -> None:
    call.grad = grad


def _grad(call: _Call) -> torch.Tensor:
    assert call.grad is not None  # only calls the backward reached are turned into layer state
    return call.grad


def _trainable_parameter(module: nn.Module) -> nn.Parameter:
    return next(p for p in module.parameters(recurse=False) if p.requires_grad)


def _cat(tensors: list[torch.Tensor], dim: int) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim)  # cat copies even a single tensor


def _per_item(module: nn.Module, x: object, n: int) -> torch.Tensor:
    """A known layer's input with one slice per item of the chunk of ``n``: a batch-1 input is expanded (a view)."""
    if not isinstance(x, torch.Tensor) or x.ndim == 0 or x.shape[0] not in (1, n):
        what = f"a tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise HooksUnsupported(f"a {type(module).__name__} was called on {what} in a chunk of {n} items: its input "
                               "is not batched along dim 0, so its per-item gradients cannot be taken from hooks")
    return x if x.shape[0] == n else x.expand(n, *x.shape[1:])


class _LayerState(Protocol):
    """What phase 2 needs of a known layer: its share of ||g_i||^2, the step size, and the perturbed forward."""

    sq_norm: torch.Tensor

    def set_scale(self, scale: torch.Tensor) -> None:
        """Fix c_i = rho / ||g_i|| for the perturbed forward (idempotent: phase 1's results are only read)."""

    def perturbed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The layer with item i's weights theta + eps_i, applied to its (perturbed, per-item) input ``x``."""
        ...


def _scale(scale: torch.Tensor | None) -> torch.Tensor:
    if scale is None:
        raise RuntimeError("set_scale must be called before the perturbed forward")
    return scale


class _AffineLayer:
    """One ``nn.Linear`` or ``nn.Conv2d`` as a matrix map: output_i = W A_i + b, A_i the [d, T] (unfolded) input.

    Built from phase 1's calls (computing ``sq_norm``, this layer's share of ||g_i||^2); after :meth:`set_scale`,
    :meth:`perturbed_forward` replaces the module's forward for phase 2.
    """

    def __init__(self, module: nn.Linear | nn.Conv2d, calls: list[_Call], adaptive: bool, for_perturbation: bool,
                 scratch: Scratch) -> None:
        self.module = module
        self.adaptive = adaptive
        self.scratch = scratch
        self.inputs = [call.input for call in calls]
        inputs = self._input_matrix(self.inputs, "unfolded")  # [N, d, T]
        out_grads = _cat([self._output_matrix(_grad(call)) for call in calls], dim=2)  # [N, p, T]
        weight, bias = module.weight, module.bias
        self.w = weight.reshape(weight.shape[0], -1)  # [p, d]
        (p, d), n, positions = self.w.shape, inputs.shape[0], inputs.shape[2]
        self.w_abs = self.w.abs() if adaptive else None
        self.w_squared = self.w.square() if adaptive else None
        self.kind = _weight_kind(positions, d, p, adaptive) if weight.requires_grad else None
        squares = []
        self.bias_grad = out_grads.sum(2) if bias is not None and bias.requires_grad else None
        if self.bias_grad is not None:
            assert bias is not None
            squares.append(((bias.abs() * self.bias_grad) if adaptive else self.bias_grad).square().sum(1))
        self.out_grads: torch.Tensor | None = out_grads
        self.kept: torch.Tensor | None = None  # per-sample gradients G_i (adaptive ball: |W| * G_i) kept for phase 2
        if self.kind == "ghost":
            grams = torch.bmm(inputs.transpose(1, 2), inputs) * torch.bmm(out_grads.transpose(1, 2), out_grads)
            squares.append(grams.sum((1, 2)))
        elif self.kind == "rank1":
            assert self.w_squared is not None
            a2, b2 = inputs[:, :, 0].square(), out_grads[:, :, 0].square()
            squares.append((b2 @ self.w_squared * a2).sum(1))
        elif self.kind == "dense":
            if for_perturbation and _keeps_gradients(positions, d, p):
                kept = self.scratch.get(("kept", module), (n, p, d), inputs)
                grads = torch.bmm(out_grads, inputs.transpose(1, 2), out=kept)
                if self.w_abs is not None:
                    grads.mul_(self.w_abs)  # |W| * G: the norm's terms, and the step is c |W| (|W| * G)
                squares.append(torch.linalg.vector_norm(grads, dim=(1, 2)).square())
                self.kept, self.inputs, self.out_grads = grads, [], None
            else:  # only the norm now (the adaptive ball's wide layers recompute the gradients in phase 2)
                norms = torch.empty_like(inputs[:, 0, 0])
                for group, grads in self._grad_groups(inputs, out_grads, None):
                    norms[group] = torch.linalg.vector_norm(grads if self.w_abs is None else grads.mul_(self.w_abs),
                                                            dim=(1, 2))
                squares.append(norms.square())
        if self.kind is None:  # frozen weight: phase 2 needs only the bias step
            self.inputs, self.out_grads = [], None
        self.sq_norm = sum(squares[1:], squares[0])
        self.scale: torch.Tensor | None = None
        self.bias_step: torch.Tensor | None = None

    def _grad_groups(self, inputs: torch.Tensor, out_grads: torch.Tensor,
                     scale: torch.Tensor | None) -> Iterator[tuple[slice, torch.Tensor]]:
        """(items, their per-sample gradients G_i = B_i A_i^T, times c_i if ``scale`` is given) in groups of about
        ``_CACHE_BLOCK`` elements, written into one scratch buffer.

        Using G_i (for a norm, or the adaptive step W + c W^2 * G_i) is memory-bound: each G_i is written, scaled
        and read again. Kept in cache one group at a time, ResNet-18's layer4 steps ran ~1.6x faster than as one
        [N, p, d] pass (and need no [N, p, d] buffer).
        """
        n = inputs.shape[0]
        size = _group_size(n, self.w.numel(), inputs.device)
        buffer = self.scratch.get("grads", (size, *self.w.shape), inputs)
        for start in range(0, n, size):
            group = slice(start, min(n, start + size))
            b = out_grads[group] if scale is None else out_grads[group] * scale[group].view(-1, 1, 1)
            yield group, torch.bmm(b, inputs[group].transpose(1, 2), out=buffer[: b.shape[0]])

    def _perturbed_weights(self, scale: torch.Tensor) -> Iterator[tuple[slice, torch.Tensor]]:
        """(items, their weights W + eps_i as [items, p, d]) in cache-sized groups, formed into a scratch buffer
        from the kept gradients (only read, so that the state stays valid) or recomputed ones."""
        if self.kept is None:  # the adaptive ball's wide layers: W + c W^2 * G, G recomputed group by group
            assert self.out_grads is not None and self.w_squared is not None
            clean = self._input_matrix(self.inputs, "unfolded_clean")
            for group, weights in self._grad_groups(clean, self.out_grads, scale):
                yield group, torch.addcmul(self.w, weights, self.w_squared, out=weights)
            return
        n = self.kept.shape[0]
        size = _group_size(n, self.w.numel(), self.kept.device)
        buffer = self.scratch.get("weights", (size, *self.w.shape), self.kept)
        for start in range(0, n, size):
            group = slice(start, min(n, start + size))
            c, out = scale[group].view(-1, 1, 1), buffer[: group.stop - start]
            if self.w_abs is not None:  # kept holds |W| * G: W + c |W| (|W| * G)
                yield group, torch.addcmul(self.w, torch.mul(self.kept[group], c, out=out), self.w_abs, out=out)
            else:
                yield group, torch.addcmul(self.w, self.kept[group], c, out=out)

    def _input_matrix(self, inputs: list[torch.Tensor], key: str) -> torch.Tensor:
        if isinstance(self.module, nn.Conv2d):
            if len(inputs) == 1:
                return _unfold(inputs[0], self.module, self.scratch, key)
            # A layer called several times: cat copies anyway, so each unfold gets its own throwaway buffer.
            return torch.cat([_unfold(x, self.module, Scratch(), key) for x in inputs], dim=2)
        return _cat([x.reshape(x.shape[0], -1, x.shape[-1]).transpose(1, 2) for x in inputs], dim=2)

    def _output_matrix(self, y: torch.Tensor) -> torch.Tensor:
        """An output-shaped tensor ([N, p, H, W] or [N, ..., p]) as [N, p, T] (a view)."""
        if isinstance(self.module, nn.Conv2d):
            return y.flatten(2)
        return y.reshape(y.shape[0], -1, y.shape[-1]).transpose(1, 2)

    def _fold(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """[N, p, T] back to the layer's output shape for input ``x``."""
        if isinstance(self.module, nn.Conv2d):
            (kh, _), (dh, _), (ph, _), (sh, _) = _conv_geometry(self.module)
            height = (x.shape[2] + 2 * ph - dh * (kh - 1) - 1) // sh + 1
            return y.reshape(y.shape[0], y.shape[1], height, -1)
        return y.transpose(1, 2).reshape(*x.shape[:-1], y.shape[1])

    def _clean_forward(self, x: torch.Tensor) -> torch.Tensor:
        # The class's own computation (``_is_fast_affine`` checked it is nn.Linear's or nn.Conv2d's), not
        # ``module(x)``: that would run the module's hooks again and, in phase 2, its swapped forward.
        if isinstance(self.module, nn.Conv2d):
            return self.module._conv_forward(x, self.module.weight, self.module.bias)
        return F.linear(x, self.module.weight, self.module.bias)

    def set_scale(self, scale: torch.Tensor) -> None:
        """Fix c_i = rho / ||g_i|| before the perturbed forward; phase 1's gradients are left as they are."""
        self.scale = scale
        bias = self.module.bias
        if self.bias_grad is not None and bias is not None:
            self.bias_step = scale.view(-1, 1) * self.bias_grad * (bias.square() if self.adaptive else 1)

    def perturbed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The layer with weights theta + eps_i, applied to its (perturbed) input ``x``."""
        scale = _scale(self.scale)
        if self.kind == "dense":
            new = self._input_matrix([x], "unfolded")
            out = new.new_empty(new.shape[0], self.w.shape[0], new.shape[2])
            for group, weights in self._perturbed_weights(scale):
                torch.bmm(weights, new[group], out=out[group])
            if self.module.bias is not None:
                out += self.module.bias.unsqueeze(1)
        else:
            out = self._output_matrix(self._clean_forward(x))  # the batched W x' + b
            if self.kind is not None:
                assert self.out_grads is not None
                clean, new = self._input_matrix(self.inputs, "unfolded_clean"), self._input_matrix([x], "unfolded")
                c = scale.view(-1, 1, 1)
                if self.kind == "ghost":  # c_i B_i (A_i^T A'_i): c scales the small [T, T'] product
                    out = torch.baddbmm(out, self.out_grads, torch.bmm(clean.transpose(1, 2), new).mul_(c))
                else:  # rank1
                    assert self.w_squared is not None
                    # [N, T', d] @ [d, p] folds the items into one matrix product (W^2 is shared)
                    spread = torch.matmul((clean * new).transpose(1, 2), self.w_squared.T).transpose(1, 2)
                    out = torch.addcmul(out, self.out_grads * c, spread)
        if self.bias_step is not None:
            out = out + self.bias_step.unsqueeze(2)
        return self._fold(out, x)


class _EmbeddingLayer:
    """An ``nn.Embedding``: item i's output at position t is the row W[k_t] for its token id k_t.

    Its per-sample gradient has a row only for the item's distinct tokens: row v is the sum of the output gradients
    B_t over the positions with k_t = v, except for ``padding_idx``, whose row autograd leaves at zero. With S_t that
    sum for position t's token (a [T, T] same-token mask times B), ||G_i||^2 = sum_t <B_t, S_t> and
    || |W| * G_i ||^2 = sum_t <W[k_t]^2 * B_t, S_t>; the perturbed layer looks up W[k'_t] + c_i S'_t (adaptive:
    W[k'_t] + c_i W[k'_t]^2 * S'_t), S' matching phase 2's ids k' against phase 1's. T^2 F per item, nothing of
    the vocabulary's size.
    """

    def __init__(self, module: nn.Embedding, calls: list[_Call], adaptive: bool, for_perturbation: bool,
                 scratch: Scratch) -> None:
        self.module = module
        self.adaptive = adaptive
        n, features = calls[0].input.shape[0], module.embedding_dim
        self.ids = _cat([call.input.reshape(n, -1) for call in calls], dim=1)  # [N, T]
        self.out_grads = _cat([_grad(call).reshape(n, -1, features) for call in calls], dim=1)  # [N, T, F]
        terms = self.out_grads * self._same_token_sums(self.ids)
        if adaptive:
            terms = terms * F.embedding(self.ids, module.weight).square()
        self.sq_norm = terms.sum((1, 2))
        self.scale: torch.Tensor | None = None

    def _same_token_sums(self, ids: torch.Tensor) -> torch.Tensor:
        """[N, T', F]: for each id of ``ids`` ([N, T']), the sum of phase 1's output gradients over the item's
        positions that looked up the same row, padding excluded (its row gets no gradient)."""
        same = ids.unsqueeze(2) == self.ids.unsqueeze(1)  # [N, T', T]
        if self.module.padding_idx is not None:
            same &= (self.ids != self.module.padding_idx).unsqueeze(1)
        return torch.bmm(same.to(self.out_grads.dtype), self.out_grads)

    def set_scale(self, scale: torch.Tensor) -> None:
        self.scale = scale

    def perturbed_forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = _scale(self.scale)
        rows = F.embedding(x, self.module.weight)  # [N, ..., F]; padding_idx only matters for the backward
        step = self._same_token_sums(x.reshape(x.shape[0], -1)).view(rows.shape)
        if self.adaptive:
            step = step * rows.square()
        return torch.addcmul(rows, step, scale.view(-1, *[1] * x.ndim))


class _NormLayer:
    """A normalisation layer y = x_hat * gamma + beta: perturbing gamma and beta per item makes it a per-item scale
    and shift of x_hat. Subclasses say how x_hat is formed and which axes gamma and beta run along."""

    def __init__(self, weight: torch.Tensor | None, bias: torch.Tensor | None, calls: list[_Call],
                 adaptive: bool) -> None:
        self.adaptive = adaptive
        self.params: dict[str, torch.Tensor | None] = {"weight": weight, "bias": bias}
        grads = self._gradients(calls)
        self.grads = {name: grads[name] for name, value in self.params.items()
                      if value is not None and value.requires_grad}
        squares = [(self._param(name).abs() * g if adaptive else g).square().flatten(1).sum(1)
                   for name, g in self.grads.items()]
        self.sq_norm = sum(squares[1:], squares[0])
        self.perturbed: dict[str, torch.Tensor | None] = {}

    def _param(self, name: str) -> torch.Tensor:
        value = self.params[name]
        assert value is not None
        return value

    def _gradients(self, calls: list[_Call]) -> dict[str, torch.Tensor]:
        """Per-item ``{"weight": [N, *param], "bias": [N, *param]}`` from phase 1's inputs and output gradients."""
        weight_grads = [self._to_parameter(self._normalize(call.input) * _grad(call)) for call in calls]
        bias_grads = [self._to_parameter(_grad(call)) for call in calls]
        return {"weight": sum(weight_grads[1:], weight_grads[0]), "bias": sum(bias_grads[1:], bias_grads[0])}

    def set_scale(self, scale: torch.Tensor) -> None:
        for name, value in self.params.items():
            if name in self.grads:
                step = self.grads[name] * (self._param(name).square() if self.adaptive else 1)
                value = self._param(name) + scale.view(-1, *[1] * (step.ndim - 1)) * step
            self.perturbed[name] = value

    def perturbed_forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._normalize(x)
        weight, bias = self.perturbed["weight"], self.perturbed["bias"]
        if weight is not None:
            out = out * self._broadcast(weight, x)
        if bias is not None:
            out = out + self._broadcast(bias, x)
        return out

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _to_parameter(self, per_position: torch.Tensor) -> torch.Tensor:
        """Sum an input-shaped tensor down to [N, *parameter shape]."""
        raise NotImplementedError

    def _broadcast(self, value: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """A shared ([*param]) or per-item ([N, *param]) parameter, shaped to broadcast against ``x``."""
        raise NotImplementedError


class _BatchNormLayer(_NormLayer):
    """Eval-mode BatchNorm: x_hat = (x - running_mean) / sqrt(running_var + eps), gamma and beta per channel."""

    def __init__(self, module: _BatchNorm, calls: list[_Call], adaptive: bool, for_perturbation: bool,
                 scratch: Scratch) -> None:
        assert module.running_mean is not None and module.running_var is not None  # see _is_fast_batchnorm
        self.running_mean = module.running_mean
        self.inv_std = torch.rsqrt(module.running_var + module.eps)
        super().__init__(module.weight, module.bias, calls, adaptive)

    def _gradients(self, calls: list[_Call]) -> dict[str, torch.Tensor]:
        # dL/dgamma = sum of x_hat * delta = (sum of x * delta - mean * sum of delta) / std: no x_hat is formed.
        per_call = [(call.input.reshape(*call.input.shape[:2], -1), _grad(call).reshape(*call.input.shape[:2], -1))
                    for call in calls]
        bias_grads = [delta.sum(2) for _, delta in per_call]
        products = [torch.einsum("nct,nct->nc", x, delta) for x, delta in per_call]
        bias_grad = sum(bias_grads[1:], bias_grads[0])
        weight_grad = self.inv_std * (sum(products[1:], products[0]) - self.running_mean * bias_grad)
        return {"weight": weight_grad, "bias": bias_grad}

    def perturbed_forward(self, x: torch.Tensor) -> torch.Tensor:
        # x * multiplier + offset per (item, channel), as an eval-mode batch norm over N * C channels with mean 0,
        # variance 1 and eps 0: exact, and the same fast kernel as the clean layer.
        weight, bias = self.perturbed["weight"], self.perturbed["bias"]
        multiplier = self.inv_std if weight is None else weight * self.inv_std
        offset = -self.running_mean * multiplier if bias is None else bias - self.running_mean * multiplier
        n, c = x.shape[:2]
        ones = x.new_ones(n * c)
        scale, shift = multiplier.expand(n, c).reshape(-1), offset.expand(n, c).reshape(-1)
        out = F.batch_norm(x.reshape(1, n * c, -1), torch.zeros_like(ones), ones, scale, shift, False, 0.0, 0.0)
        return out.view(x.shape)


class _LayerNormLayer(_NormLayer):
    """LayerNorm over the trailing ``normalized_shape`` axes; gamma and beta have that shape."""

    def __init__(self, module: nn.LayerNorm, calls: list[_Call], adaptive: bool, for_perturbation: bool,
                 scratch: Scratch) -> None:
        self.shape, self.eps = tuple(module.normalized_shape), module.eps
        super().__init__(module.weight, module.bias, calls, adaptive)

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.shape, None, None, self.eps)

    def _to_parameter(self, per_position: torch.Tensor) -> torch.Tensor:
        return per_position.reshape(per_position.shape[0], -1, *self.shape).sum(1)

    def _broadcast(self, value: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if value.ndim == len(self.shape):
            return value
        return value.view(value.shape[0], *[1] * (x.ndim - 1 - len(self.shape)), *self.shape)


class _GroupNormLayer(_NormLayer):
    """GroupNorm: statistics per item and channel group; gamma and beta per channel (axis 1)."""

    def __init__(self, module: nn.GroupNorm, calls: list[_Call], adaptive: bool, for_perturbation: bool,
                 scratch: Scratch) -> None:
        self.num_groups, self.eps = module.num_groups, module.eps
        super().__init__(module.weight, module.bias, calls, adaptive)

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, self.num_groups, None, None, self.eps)

    def _to_parameter(self, per_position: torch.Tensor) -> torch.Tensor:
        return per_position.reshape(*per_position.shape[:2], -1).sum(2)

    def _broadcast(self, value: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        channels = x.shape[1]
        leading = (value.shape[0], channels) if value.ndim == 2 else (1, channels)
        return value.reshape(*leading, *[1] * (x.ndim - 2))


def _layer_state(module: nn.Module, calls: list[_Call], adaptive: bool, for_perturbation: bool,
                 scratch: Scratch) -> _LayerState:
    if isinstance(module, _BatchNorm):
        return _BatchNormLayer(module, calls, adaptive, for_perturbation, scratch)
    if isinstance(module, nn.LayerNorm):
        return _LayerNormLayer(module, calls, adaptive, for_perturbation, scratch)
    if isinstance(module, nn.GroupNorm):
        return _GroupNormLayer(module, calls, adaptive, for_perturbation, scratch)
    if isinstance(module, nn.Embedding):
        return _EmbeddingLayer(module, calls, adaptive, for_perturbation, scratch)
    assert isinstance(module, (nn.Linear, nn.Conv2d))
    return _AffineLayer(module, calls, adaptive, for_perturbation, scratch)


def _check_expansion(model: nn.Module, x: torch.Tensor, logits: torch.Tensor) -> None:
    """Raise unless the model's own forward gives the logits that phase 1 got with batch-1 inputs expanded.

    Expanding is exact when the layer's output is only broadcast against per-item tensors (BERT's position
    embeddings); code that indexes or reduces that output along dim 0 would compute something else.
    """
    with torch.no_grad():
        expected = model(x)
    if not torch.allclose(logits.detach(), expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item()):
        raise HooksUnsupported("a known layer's batch-1 input, given one copy per item, changed the model's "
                               "outputs, so its per-item gradients cannot be taken from hooks")


def _phase_one(
    model: nn.Module, x: torch.Tensor, adaptive: bool, for_perturbation: bool, scratch: Scratch
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[nn.Module, _LayerState]]:
    """Clean loss, pseudo labels, per-sample squared gradient norm and the per-layer state phase 2 needs."""
    layers = _fast_layers(model)
    n = x.shape[0]
    calls: dict[nn.Module, list[_Call]] = {m: [] for m in layers}
    expanded = []

    def per_item(module: nn.Module, args: tuple[object, ...]) -> tuple[object, ...] | None:
        first = _per_item(module, args[0] if args else None, n)
        if first is args[0]:
            return None
        expanded.append(module)
        return (first, *args[1:])

    def record(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if not output.requires_grad:  # run under no_grad inside the model: no gradient reaches its parameters
            return
        call = _Call(args[0], args[0]._version, output, output._version)
        calls[module].append(call)
        output.register_hook(partial(_store_grad, call))

    with (hooks_registered(layers, lambda m: m.register_forward_pre_hook(per_item)),
          hooks_registered(layers, lambda m: m.register_forward_hook(record)), torch.enable_grad()):
        logits = model(x)
        check_logits(logits, x)
        pseudo = logits.argmax(dim=1)
        clean = F.cross_entropy(logits, pseudo, reduction="none")
    if expanded and not scratch.expansion_checked:
        _check_expansion(model, x, logits)
        scratch.expansion_checked = True
    # Backward only as far as the layers' outputs: no weight gradient, and no input gradient of the first layer
    # (slow for one-channel images). An output changed in place since is no longer the layer's output to autograd;
    # the layer's own parameter stands in for it, and the hook fires on the way there.
    targets = {}
    for module, module_calls in calls.items():
        for call in module_calls:
            output = call.output
            assert output is not None
            target = output if output._version == call.output_version else _trainable_parameter(module)
            if target.requires_grad:
                targets[id(target)] = target
            call.output = None
    if targets:
        torch.autograd.grad(clean.sum(), list(targets.values()), allow_unused=True)
    state: dict[nn.Module, _LayerState] = {}
    with torch.no_grad():
        for module, module_calls in calls.items():
            if any(call.input._version != call.input_version for call in module_calls):
                raise HooksUnsupported(f"the input of a {type(module).__name__} was modified in place after the "
                                       "layer ran, so its per-sample gradients cannot be taken from it; use "
                                       "method='vmap'")
            reached = [call for call in module_calls if call.grad is not None]  # others do not affect the loss
            if reached:
                state[module] = _layer_state(module, reached, adaptive, for_perturbation, scratch)
        sq_norm = torch.zeros_like(clean)
        for layer in state.values():
            sq_norm = sq_norm + layer.sq_norm
    return clean.detach(), pseudo, sq_norm, state


def _perturbed_call(layer: _LayerState, module: nn.Module, n: int, x: torch.Tensor) -> torch.Tensor:
    return layer.perturbed_forward(_per_item(module, x, n))


@contextmanager
def _perturbed_forwards(state: dict[nn.Module, _LayerState], n: int) -> Iterator[None]:
    """Each known layer's ``forward`` swapped for its per-item-perturbed one for the duration of the block.

    A swapped forward is an instance attribute over the class's (known layers have none of their own, see
    ``_is_fast``), so restoring is deleting it. Each module is listed before its forward is set and the deleting is
    in ``finally``, so no layer keeps a perturbed forward, whatever raises and wherever.
    """
    swapped: list[nn.Module] = []
    try:
        for module, layer in state.items():
            swapped.append(module)
            vars(module)["forward"] = partial(_perturbed_call, layer, module, n)
        yield
    finally:
        for module in swapped:
            vars(module).pop("forward", None)


def hooks_norms(model: nn.Module, x: torch.Tensor, adaptive: bool,
                scratch: Scratch | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean pseudo-label loss and per-sample gradient norm (plain or adaptive), from one forward and backward."""
    clean, _, sq_norm, _ = _phase_one(model, x, adaptive, False, scratch or Scratch())
    return clean, sq_norm.sqrt()


def hooks_losses(model: nn.Module, x: torch.Tensor, rho: float, adaptive: bool,
                 scratch: Scratch | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean and perturbed pseudo-label loss of every item in ``x`` (exact SAAL, models of known layers).

    Pass the same ``scratch`` for every chunk of a pool so that its buffers are reused.
    """
    clean, pseudo, sq_norm, state = _phase_one(model, x, adaptive, True, scratch or Scratch())
    with torch.no_grad():
        scale = rho / (sq_norm.sqrt() + DENOMINATOR_EPS)
        for layer in state.values():
            layer.set_scale(scale)
        # Everything between the known layers runs as usual.
        with _perturbed_forwards(state, len(x)):
            perturbed = F.cross_entropy(model(x), pseudo, reduction="none")
    return clean, perturbed


def hooks_bytes_per_sample(model: nn.Module, probe: torch.Tensor, adaptive: bool) -> int:
    """Rough peak working memory per item of :func:`hooks_losses`, from the layer shapes of one probe forward.

    Counts what autograd keeps in phase 1 (twice the leaf modules' outputs, for the functional ops between them),
    the known layers' stored inputs and output gradients, the plain ball's kept dense gradients, and the largest
    temporaries (two unfolded inputs, Gram matrices, an embedding's same-token masks). The adaptive ball's
    per-sample gradients live in one cache-sized buffer whatever the chunk size, so they are not counted per item.
    """
    fast = set(_fast_layers(model))
    calls = probe_leaf_calls(model, probe)
    stored = largest_unfolded = largest_grams = 0
    for call in calls:
        if call.module not in fast:
            continue
        n_in, n_out = call.input_shape.numel(), call.output_shape.numel()
        stored += n_in + n_out
        if isinstance(call.module, nn.Embedding):
            largest_grams = max(largest_grams, 2 * n_in**2)  # [T, T] masks, phase 1's and phase 2's
            continue
        if not _is_fast_affine(call.module):  # normalisation layers keep nothing bigger than their input
            continue
        assert isinstance(call.module, (nn.Linear, nn.Conv2d))
        p = call.output_shape[1] if isinstance(call.module, nn.Conv2d) else call.output_shape[-1]
        positions, d = n_out // p, call.module.weight[0].numel()
        kind = _weight_kind(positions, d, p, adaptive)
        stored += p * d if kind == "dense" and _keeps_gradients(positions, d, p) else 0  # kept per-sample gradients
        largest_grams = max(largest_grams, 2 * positions**2 if kind == "ghost" else 0)
        largest_unfolded = max(largest_unfolded, d * positions if isinstance(call.module, nn.Conv2d) else 0)
    activations = sum(call.output_shape.numel() for call in calls)
    return element_size(probe) * (2 * activations + stored + 2 * largest_unfolded + largest_grams)
