"""saal_scores against the one-item-at-a-time reference loop (float64), for every engine, ball and mode."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from benchmarks.reference_loop import reference_saal_scores  # the repository root is on sys.path (tests/conftest.py)
from saal_lightning.acquisition.per_sample_hooks import hooks_problems
from saal_lightning.acquisition.saal_score import saal_scores
from saal_lightning.models.backbones import build_backbone

RTOL = 1e-4  # the bound; the exact engines agree with the loop to ~1e-13 in float64
DTYPE = torch.float64


def _close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = RTOL) -> None:
    assert actual.shape == expected.shape
    assert actual.dtype == expected.dtype
    assert ((actual - expected).abs() / expected.abs().clamp_min(1e-12)).max().item() < rtol, (actual, expected)


def _warm_batchnorm(model: nn.Module, shape: tuple[int, ...], seed: int) -> nn.Module:
    """Give BatchNorm non-trivial running statistics (mean != 0, var != 1), then switch to eval."""
    generator = torch.Generator().manual_seed(seed)
    model.to(DTYPE).train()
    with torch.no_grad():
        for _ in range(3):
            model(2.0 * torch.randn(8, *shape, generator=generator, dtype=DTYPE) + 0.5)
    return model.eval()


class Exotic(nn.Module):
    """Every hook-engine case in a few layers: strided/dilated convs with and without bias, a conv and a linear
    called twice, an in-place ReLU on a BatchNorm's output, a linear over tokens (T > 1), BatchNorm1d, a frozen
    bias. Plain ball: dense and ghost (the twice-called linear) layers; adaptive: kept, recomputed (the twice-called
    linear) and rank-1 (the head) layers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.shared = nn.Conv2d(4, 4, 3, padding=2, dilation=2, bias=False)
        self.tokens = nn.Linear(4, 6)
        self.bn1d = nn.BatchNorm1d(6)
        self.mix = nn.Linear(6, 6)
        self.head = nn.Linear(6, 5)
        self.head.bias.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn(self.conv(x)), inplace=True)
        out = self.shared(torch.tanh(self.shared(out)))
        tokens = torch.tanh(self.tokens(out.flatten(2).transpose(1, 2)))  # [N, T, 6]
        pooled = self.bn1d(tokens.mean(1))
        return self.head(torch.tanh(self.mix(torch.tanh(self.mix(pooled)))))


class Normalised(nn.Module):
    """LayerNorm and GroupNorm, which normalise each item with its own statistics: GroupNorm after a conv, a
    LayerNorm over tokens ([N, T, D]) with a frozen bias, a LayerNorm over two trailing axes, and one without bias."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.group = nn.GroupNorm(2, 4)
        self.token_norm = nn.LayerNorm(4)
        self.token_norm.bias.requires_grad_(False)
        self.plane_norm = nn.LayerNorm([4, 4])
        self.no_bias = nn.LayerNorm(4, bias=False)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.tanh(self.group(self.conv(x)))  # [N, 4, 2, 2]
        tokens = torch.tanh(self.token_norm(out.flatten(2).transpose(1, 2)))  # [N, 4 positions, 4 channels]
        plane = torch.tanh(self.plane_norm(tokens))  # normalised over both trailing axes
        return self.head(self.no_bias(plane.mean(1)))


class WithPReLU(nn.Module):
    """A layer the hook engine does not know (PReLU has a trainable slope): 'auto' must use vmap."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.PReLU())
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class StaleInput(nn.Module):
    """Changes its first layer's input in place after the layer ran: the stored input would be stale."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = x.clone()
        out = self.first(hidden)
        return out + hidden.add_(1.0)[:, :3]


def _setup(name: str, n: int, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    if name == "exotic":
        shape = (2, 9, 9)
        model = _warm_batchnorm(Exotic(), shape, seed)
    elif name == "norms":
        shape = (3, 2, 2)
        model = Normalised().to(DTYPE).eval()
        with torch.no_grad():  # gamma and beta away from their 1 and 0 initialisation
            for norm in (model.group, model.token_norm, model.plane_norm, model.no_bias):
                for parameter in norm.parameters():
                    parameter.add_(0.3 * torch.randn(parameter.shape, dtype=DTYPE))
    elif name == "prelu":
        shape = (3, 2, 2)
        model = WithPReLU().to(DTYPE).eval()
    else:
        shape = (1, 28, 28)
        model = _warm_batchnorm(build_backbone(name, num_classes=10, in_channels=1), shape, seed)
    inputs = torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed + 1), dtype=DTYPE)
    return model, inputs


MODELS = {"small_cnn": 5, "resnet18": 3, "exotic": 4, "norms": 4, "prelu": 4}


@pytest.fixture(scope="module")
def cases() -> dict:
    """Per (model, adaptive): the model, inputs, and the reference loop's scores in both modes."""
    out = {}
    for name, n in MODELS.items():
        model, inputs = _setup(name, n)
        for adaptive in (False, True):
            # A larger adaptive radius keeps the perturbation's effect well above the tolerance.
            rho = 0.5 if adaptive else 0.05
            ref = {mode: reference_saal_scores(model, inputs, rho, adaptive, mode) for mode in ("max", "diff")}
            out[name, adaptive] = (model, inputs, rho, ref)
    return out


# The hook engine refuses the PReLU model (tested below); "auto" must fall back to vmap there.
EXACT_CASES = [(name, method) for name in MODELS for method in ("hooks", "vmap", "auto")
               if (name, method) != ("prelu", "hooks")]


@pytest.mark.parametrize("mode", ["max", "diff"])
@pytest.mark.parametrize("adaptive", [False, True], ids=["plain", "adaptive"])
@pytest.mark.parametrize(("name", "method"), EXACT_CASES)
def test_exact_methods_match_reference_loop(cases, name, method, adaptive, mode):
    model, inputs, rho, ref = cases[name, adaptive]
    # The perturbation must matter, or agreement would prove nothing about it.
    assert (ref["diff"].abs() > 10 * RTOL * ref["max"].abs()).all()
    scores = saal_scores(model, inputs, rho=rho, adaptive=adaptive, mode=mode, method=method, chunk_size=2)
    _close(scores, ref[mode])


def test_reference_agrees_with_a_different_radius_only_loosely(cases):
    """Guards the parity test's teeth: a 2 % change of rho is far outside the tolerance."""
    model, inputs, rho, ref = cases["small_cnn", False]
    other = saal_scores(model, inputs, rho=rho * 1.02, mode="diff", method="hooks")
    assert ((other - ref["diff"]).abs() / ref["diff"].abs()).min() > 10 * RTOL


def test_hooks_refuses_unknown_layers_and_auto_falls_back():
    model, inputs = _setup("prelu", 3)
    problems = hooks_problems(model)
    assert any("PReLU" in p for p in problems)
    with pytest.raises(ValueError, match="PReLU"):
        saal_scores(model, inputs, method="hooks")
    assert hooks_problems(_setup("norms", 1)[0]) == []  # LayerNorm and GroupNorm are known layers
    with pytest.warns(UserWarning, match=r"cannot score this model \(body.2 \(PReLU\).*torch.func"):
        saal_scores(model, inputs, method="auto")


def test_hooks_refuses_a_layer_input_changed_in_place():
    model = StaleInput().to(DTYPE).eval()
    with pytest.raises(RuntimeError, match="modified in place"):
        saal_scores(model, torch.randn(3, 5, dtype=DTYPE), method="hooks")


@pytest.mark.parametrize("method", ["hooks", "vmap", "first_order", "last_layer"])
def test_model_state_is_restored_exactly(method):
    model, inputs = _setup("small_cnn", 3)
    model.train()
    model.features[1].eval()  # mixed flags must come back as they were, not as one model-wide flag
    model.head.weight.grad = torch.full_like(model.head.weight, 7.0)
    flags = {name: m.training for name, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    saal_scores(model, inputs, adaptive=True, method=method)
    assert {name: m.training for name, m in model.named_modules()} == flags
    after = model.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state)  # buffers too: BN did not update running stats
    assert {name: p.requires_grad for name, p in model.named_parameters()} == requires_grad
    assert torch.equal(model.head.weight.grad, torch.full_like(model.head.weight, 7.0))
    assert all(p.grad is None for name, p in model.named_parameters() if name != "head.weight")


@pytest.mark.parametrize("method", ["hooks", "vmap"])
def test_chunking_does_not_change_scores(method):
    model, inputs = _setup("small_cnn", 5)
    whole = saal_scores(model, inputs, adaptive=True, method=method, chunk_size=5)
    for kwargs in ({"chunk_size": 1}, {"chunk_size": 3}, {"max_memory": 1}, {}):
        torch.testing.assert_close(saal_scores(model, inputs, adaptive=True, method=method, **kwargs), whole,
                                   rtol=1e-12, atol=1e-12)


def test_hook_engine_needs_far_less_memory_per_item_than_vmap():
    from saal_lightning.acquisition.per_sample_hooks import hooks_bytes_per_sample
    from saal_lightning.acquisition.per_sample_vmap import vmap_bytes_per_sample

    model, inputs = _setup("resnet18", 1)
    probe = inputs[:1].float()
    model = model.float()
    hooks = hooks_bytes_per_sample(model, probe, adaptive=False)
    vmap = vmap_bytes_per_sample(model, probe, adaptive=False)
    n_params = sum(p.numel() for p in model.parameters())
    assert vmap > 8 * n_params  # the vmap engine holds a gradient and a perturbed copy of every weight per item
    assert hooks < vmap / 4  # the point of the hook engine


def _first_order_reference(model, inputs, rho, adaptive):
    """loss + rho * ||g|| (or || |w| g ||), with g from autograd one item at a time."""
    params = [p for p in model.parameters() if p.requires_grad]
    out = []
    for x in inputs:
        logits = model(x.unsqueeze(0))
        loss = F.cross_entropy(logits, logits.argmax(1))
        grads = torch.autograd.grad(loss, params)
        terms = [((p.abs() * g) if adaptive else g).square().sum() for p, g in zip(params, grads, strict=True)]
        norm = torch.stack(terms).sum().sqrt()
        out.append(loss.detach() + rho * norm)
    return torch.stack(out)


@pytest.mark.parametrize("adaptive", [False, True], ids=["plain", "adaptive"])
@pytest.mark.parametrize("name", ["small_cnn", "exotic", "norms", "prelu"])  # every hook norm kind, and vmap
def test_first_order_is_loss_plus_rho_times_gradient_norm(name, adaptive):
    model, inputs = _setup(name, 4)
    rho = 0.05
    expected = _first_order_reference(model, inputs, rho, adaptive)
    _close(saal_scores(model, inputs, rho=rho, adaptive=adaptive, method="first_order"), expected, rtol=1e-10)
    clean = F.cross_entropy(model(inputs), model(inputs).argmax(1), reduction="none").detach()
    _close(saal_scores(model, inputs, rho=rho, adaptive=adaptive, method="first_order", mode="diff"),
           expected - clean, rtol=1e-8)


@pytest.mark.parametrize("mode", ["max", "diff"])
@pytest.mark.parametrize("adaptive", [False, True], ids=["plain", "adaptive"])
@pytest.mark.parametrize("name", ["small_cnn", "exotic"])  # exotic's head has a frozen bias
def test_last_layer_matches_loop_that_perturbs_only_the_head(name, adaptive, mode):
    model, inputs = _setup(name, 4)
    rho = 0.5
    expected = reference_saal_scores(model, inputs, rho, adaptive, mode,
                                     perturb=lambda n, p: n.startswith("head.") and p.requires_grad)
    _close(saal_scores(model, inputs, rho=rho, adaptive=adaptive, mode=mode, method="last_layer"), expected,
           rtol=1e-10)


def test_last_layer_refuses_a_model_whose_output_is_not_the_head():
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh()).to(DTYPE)
    with pytest.raises(ValueError, match="last nn.Linear"):
        saal_scores(model, torch.randn(2, 4, dtype=DTYPE), method="last_layer")


@pytest.mark.parametrize("method", ["hooks", "vmap"])
def test_works_under_no_grad_and_inference_mode_and_with_progress_bar(method):
    model, inputs = _setup("small_cnn", 3)
    expected = saal_scores(model, inputs, method=method)
    with torch.no_grad():
        torch.testing.assert_close(saal_scores(model, inputs, method=method), expected, rtol=1e-12, atol=1e-12)
    with torch.inference_mode():
        frozen_inputs = inputs.clone()
        scores = saal_scores(model, frozen_inputs, method=method, progress=True)
    torch.testing.assert_close(scores, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rho": 0.0}, "rho"),
        ({"rho": -0.1}, "rho"),
        ({"rho": float("nan")}, "rho"),
        ({"rho": True}, "rho"),
        ({"mode": "min"}, "mode"),
        ({"method": "loop"}, "method"),
        ({"adaptive": "yes"}, "adaptive"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"chunk_size": 2.5}, "chunk_size"),
        ({"max_memory": -1}, "max_memory"),
        ({"chunk_size": 4, "max_memory": 1 << 20}, "not both"),
    ],
)
def test_invalid_arguments_raise_value_error(kwargs, match):
    model, inputs = _setup("small_cnn", 2)
    with pytest.raises(ValueError, match=match):
        saal_scores(model, inputs, **kwargs)


def test_invalid_inputs_and_models():
    model, inputs = _setup("small_cnn", 2)
    with pytest.raises(ValueError, match="at least one item"):
        saal_scores(model, inputs[:0])
    with pytest.raises(TypeError, match="tensor"):
        saal_scores(model, inputs.tolist())
    frozen = build_backbone("small_cnn", 10, 1).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        saal_scores(frozen, inputs.float())
    with pytest.raises(ValueError, match="logits"):
        saal_scores(nn.Sequential(nn.Flatten(), nn.Linear(784, 3), nn.Unflatten(1, (3, 1))).to(DTYPE), inputs)
