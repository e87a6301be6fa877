"""Whatever raises inside saal_scores, the model is exactly as before: its modules and their attributes (no layer keeps
a swapped ``forward``), parameters, buffers, ``.grad``, ``requires_grad``, training flags and hooks.

Failures are injected at every point of a call in turn: a layer of the model that raises (on its first call: the
clean forward; later: the perturbed forward, the second chunk, the vmap engine's passes), and out-of-memory errors
raised from the kernels the engines call (``F.linear``, ``torch.bmm``, ``F.embedding``, the norm), from the tensor
hook that receives output gradients during the backward, from the step set-up and from the swapped forward.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from benchmarks.bert_like import BertLikeConfig, BertLikeForSequenceClassification, random_token_ids
from saal_lightning.acquisition import per_sample_hooks, per_sample_vmap
from saal_lightning.acquisition.saal_score import saal_scores

DTYPE = torch.float64
OOM = "CUDA out of memory. Tried to allocate 2.00 GiB"
# Every per-module dict of hooks torch keeps (those a version lacks are skipped).
HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
              "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
              "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


class Trigger:
    """Counts calls; raises ``error`` on call number ``fail_at`` (1-based; ``None``: never)."""

    def __init__(self) -> None:
        self.calls = 0
        self.fail_at: int | None = None
        self.error: BaseException = RuntimeError(OOM)

    def tick(self) -> None:
        self.calls += 1
        if self.calls == self.fail_at:
            raise self.error

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            self.tick()
            return fn(*args, **kwargs)

        return wrapped


class Flaky(nn.Module):
    """A parameter-free layer that ticks its trigger on every call (the trigger is an attribute whose identity stays
    the same, so the module's attributes are comparable before and after)."""

    def __init__(self, trigger: Trigger) -> None:
        super().__init__()
        self.trigger = trigger

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.trigger.tick()
        return x


class Vision(nn.Module):
    """Conv, eval-mode BatchNorm with an in-place ReLU, a conv called twice, GroupNorm, LayerNorm over tokens, a
    linear over tokens and a head; with ``prelu`` a layer the hook engine does not know (so "auto" falls back)."""

    def __init__(self, trigger: Trigger, prelu: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.twice = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.group = nn.GroupNorm(2, 4)
        self.flaky = Flaky(trigger)
        self.tokens = nn.Linear(4, 6)
        self.norm = nn.LayerNorm(6)
        self.act = nn.PReLU() if prelu else nn.Tanh()
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn(self.conv(x)), inplace=True)
        out = self.flaky(self.group(self.twice(torch.tanh(self.twice(out)))))
        tokens = self.norm(self.tokens(out.flatten(2).transpose(1, 2)))  # [N, T, 6]
        return self.head(self.act(tokens.mean(1)))


def _vision(trigger: Trigger, prelu: bool = False) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = Vision(trigger, prelu).to(DTYPE)
    with torch.no_grad():  # running statistics away from 0 and 1
        model.train()(torch.randn(8, 2, 4, 4, dtype=DTYPE) * 2 + 0.5)
    return model.eval(), torch.randn(4, 2, 4, 4, dtype=DTYPE, generator=torch.Generator().manual_seed(1))


def _text(trigger: Trigger) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    config = BertLikeConfig(num_hidden_layers=1)
    model = BertLikeForSequenceClassification(config).to(DTYPE).eval()
    feed_forward = model.bert.encoder.layer[0].intermediate
    feed_forward.intermediate_act_fn = nn.Sequential(nn.GELU(), Flaky(trigger))
    return model, random_token_ids(4, 8, config, torch.Generator().manual_seed(1))


MODELS = {"vision": _vision, "fallback": lambda trigger: _vision(trigger, prelu=True), "text": _text}


def _add_user_state(model: nn.Module) -> None:
    """What a user's model may carry and must keep: hooks of several kinds, a gradient, a frozen parameter."""
    model.register_forward_hook(lambda module, args, output: None)
    model.register_forward_pre_hook(lambda module, args: None)
    head = model.head if hasattr(model, "head") else model.classifier
    head.register_forward_pre_hook(lambda module, args: None)  # on a layer the engine swaps in phase 2
    head.weight.register_hook(lambda grad: None)
    head.weight.grad = torch.full_like(head.weight, 7.0)
    head.bias.requires_grad_(False)


def snapshot(model: nn.Module) -> dict[str, Any]:
    """Identities, flags and copies of everything a scoring call could leave changed."""
    modules = {}
    for name, module in model.named_modules(remove_duplicate=False):
        modules[name] = {
            "object": id(module),
            "type": type(module),
            "training": module.training,
            # an instance-level 'forward' gained or lost, or any attribute rebound, shows here
            "attributes": {key: id(value) for key, value in vars(module).items()},
            "parameters": [(key, id(value)) for key, value in module._parameters.items()],
            "buffers": [(key, id(value)) for key, value in module._buffers.items()],
            "children": [(key, id(value)) for key, value in module._modules.items()],
            **{key: [(k, id(v)) for k, v in getattr(module, key).items()] for key in HOOK_DICTS
               if hasattr(module, key)},
        }
    tensors = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        tensors["parameter " + name] = {
            "object": p, "value": p.detach().clone(), "version": p._version, "requires_grad": p.requires_grad,
            "grad": p.grad, "grad value": None if p.grad is None else p.grad.clone(),
            "grad version": None if p.grad is None else p.grad._version,
            "tensor hooks": None if p._backward_hooks is None else dict(p._backward_hooks),
            "post-accumulate hooks": getattr(p, "_post_accumulate_grad_hooks", None),
        }
    for name, b in model.named_buffers(remove_duplicate=False):
        tensors["buffer " + name] = {"object": b, "value": b.clone(), "version": b._version}
    return {"modules": modules, "tensors": tensors}


def assert_unchanged(before: dict[str, Any], after: dict[str, Any]) -> None:
    assert after["modules"] == before["modules"]
    assert after["tensors"].keys() == before["tensors"].keys()
    for name, was in before["tensors"].items():
        now = after["tensors"][name]
        for key, value in was.items():
            if isinstance(value, torch.Tensor):
                if key in ("object", "grad"):
                    assert now[key] is value, (name, key)
                else:
                    assert value.dtype == now[key].dtype and torch.equal(value, now[key]), (name, key)
            else:
                assert now[key] == value, (name, key, now[key], value)


@contextmanager
def injected(monkeypatch: pytest.MonkeyPatch, point: str, trigger: Trigger) -> Iterator[None]:
    """Route one injection point through ``trigger`` (``layer`` is the model's own Flaky layer)."""
    with monkeypatch.context() as patch:
        targets = {
            "F.linear": (F, "linear"),
            "torch.bmm": (torch, "bmm"),
            "F.embedding": (F, "embedding"),
            "vector_norm": (torch.linalg, "vector_norm"),
            "tensor hook": (per_sample_hooks, "_store_grad"),
            "set_scale": (per_sample_hooks._AffineLayer, "set_scale"),
            "swapped forward": (per_sample_hooks, "_perturbed_call"),
            "functional_call": (per_sample_vmap, "functional_call"),
        }
        if point in targets:
            owner, name = targets[point]
            patch.setattr(owner, name, trigger.wrap(getattr(owner, name)))
        yield


POINTS = ("layer", "F.linear", "torch.bmm", "F.embedding", "vector_norm", "tensor hook", "set_scale",
          "swapped forward", "functional_call")
METHODS = {"vision": ("hooks", "vmap", "auto", "first_order", "last_layer"),
           "fallback": ("auto", "first_order"),
           "text": ("hooks", "vmap", "auto", "first_order", "last_layer")}
CASES = [(model, method) for model, methods in METHODS.items() for method in methods]
MOST_POSITIONS = 6  # failure positions tried per point: evenly spaced over the call, first and last included


def _positions(count: int) -> list[int]:
    if count <= MOST_POSITIONS:
        return list(range(1, count + 1))
    return sorted({round(1 + i * (count - 1) / (MOST_POSITIONS - 1)) for i in range(MOST_POSITIONS)})


@pytest.mark.filterwarnings("ignore:saal_scores. the fast hook engine")
@pytest.mark.parametrize(("name", "method"), CASES)
def test_a_failure_anywhere_leaves_the_model_exactly_as_it_was(monkeypatch, name, method):
    trigger = Trigger()
    model, inputs = MODELS[name](trigger)
    _add_user_state(model)
    model.train()
    (model.bn if hasattr(model, "bn") else model.bert).eval()  # mixed training flags must come back as they were
    untouched = copy.deepcopy(model)
    before = snapshot(model)

    def score(target: nn.Module) -> torch.Tensor:
        return saal_scores(target, inputs, rho=0.5, adaptive=True, method=method, chunk_size=2)

    injections = 0
    for point in POINTS:
        trigger.calls, trigger.fail_at = 0, None
        with injected(monkeypatch, point, trigger):
            score(model)  # counts the calls through this point
            count = trigger.calls
            for position in _positions(count):
                trigger.calls, trigger.fail_at = 0, position
                with pytest.raises(RuntimeError, match="out of memory"):
                    score(model)
                assert_unchanged(before, snapshot(model))
                injections += 1
        if point == "layer" and count:  # the layer itself raising, as a bug in the model would
            for error in (ValueError("a bug in the model"), KeyboardInterrupt()):
                trigger.calls, trigger.fail_at, trigger.error = 0, min(2, count), error
                with pytest.raises(type(error)):
                    score(model)
                assert_unchanged(before, snapshot(model))
            trigger.error = RuntimeError(OOM)
    assert injections >= 20  # the sweep reached many points, not just one
    trigger.calls, trigger.fail_at = 0, None
    # Afterwards the model scores and predicts exactly as a copy that never saw a failure.
    assert torch.equal(score(model), score(untouched))
    outputs = []
    for target in (model, untouched):  # the same dropout draws: the model is in training mode
        torch.manual_seed(0)
        outputs.append(target(inputs))
    assert torch.equal(*outputs)
    assert_unchanged(before, snapshot(model))


def test_a_failure_between_the_layers_swaps_restores_every_forward(monkeypatch):
    """The defect this guards: the perturbed forwards were swapped in before the ``try``, so a failure while setting
    up a later layer left earlier layers with their perturbed forward, and the model's outputs changed afterwards."""
    model, inputs = _vision(Trigger())
    expected = model(inputs)
    trigger = Trigger()
    trigger.fail_at = 2  # the second layer's set-up, after the first layer's
    layer = per_sample_hooks._AffineLayer
    monkeypatch.setattr(layer, "set_scale", trigger.wrap(layer.set_scale))
    with pytest.raises(RuntimeError, match="out of memory"):
        saal_scores(model, inputs, method="hooks")
    assert trigger.calls == 2
    assert not any("forward" in vars(module) for module in model.modules())
    assert torch.equal(model(inputs), expected)


def test_layer_state_is_not_changed_by_using_it(monkeypatch):
    """The step set-up and the perturbed pass only read phase 1's results (``out_grads`` used to be scaled in
    place, so a second use scaled twice): the same state run twice gives the same perturbed losses."""
    for name in ("vision", "text"):
        model, inputs = MODELS[name](Trigger())
        for adaptive in (False, True):
            clean, pseudo, sq_norm, state = per_sample_hooks._phase_one(model, inputs, adaptive, True,
                                                                        per_sample_hooks.Scratch())
            scale = 0.5 / (sq_norm.sqrt() + 1e-12)
            runs = []
            for _ in range(2):
                with torch.no_grad():
                    for layer in state.values():
                        layer.set_scale(scale)
                    with per_sample_hooks._perturbed_forwards(state, len(inputs)):
                        runs.append(F.cross_entropy(model(inputs), pseudo, reduction="none"))
            assert torch.equal(runs[0], runs[1])
            expected = saal_scores(model, inputs, rho=0.5, adaptive=adaptive, method="hooks")
            torch.testing.assert_close(runs[0], expected, rtol=1e-12, atol=1e-12)
