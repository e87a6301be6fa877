"""Text models on the hook engine: nn.Embedding (with padding_idx) as a known layer, nn.Linear and nn.LayerNorm on
[batch, tokens, features], attention as matmul + softmax between them, all against the float64 one-item loop."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from benchmarks.bert_like import BertLikeConfig, BertLikeForSequenceClassification, random_token_ids
from benchmarks.reference_loop import reference_saal_scores
from saal_lightning.acquisition.per_sample_hooks import HooksUnsupported, hooks_problems
from saal_lightning.acquisition.saal_score import saal_scores

RTOL = 1e-4  # the bound; the hook engine agrees with the loop to ~1e-15 here
DTYPE = torch.float64
RHO = {False: 0.05, True: 0.5}  # plain, adaptive: a larger adaptive radius keeps its effect well above RTOL


def _close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = RTOL) -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    assert ((actual - expected).abs() / expected.abs().clamp_min(1e-12)).max().item() < rtol, (actual, expected)


def _bert() -> tuple[nn.Module, torch.Tensor]:
    """A two-layer BERT-style encoder in float64 with a small vocabulary (tokens repeat within a sequence), gamma and
    beta away from 1 and 0, and a non-zero padding row (the forward reads it; its gradient is zero); five padded
    sequences of different lengths, one without padding."""
    torch.manual_seed(0)
    config = BertLikeConfig(vocab_size=12, hidden_size=8, num_attention_heads=2, intermediate_size=16,
                            max_position_embeddings=12)
    model = BertLikeForSequenceClassification(config).to(DTYPE).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.add_(0.3 * torch.randn_like(module.weight))
                module.bias.add_(0.3 * torch.randn_like(module.bias))
        model.bert.embeddings.word_embeddings.weight[config.pad_token_id].normal_()
    ids = random_token_ids(5, 10, config, torch.Generator().manual_seed(1), min_length=3)
    ids[0, :] = random_token_ids(1, 10, config, torch.Generator().manual_seed(2), min_length=10)
    assert (ids == config.pad_token_id).any() and (ids[0] != config.pad_token_id).all()
    return model, ids


@pytest.fixture(scope="module")
def bert_reference() -> dict:
    model, ids = _bert()
    return {adaptive: {mode: reference_saal_scores(model, ids, RHO[adaptive], adaptive, mode)
                       for mode in ("max", "diff")} for adaptive in (False, True)}


def test_bert_like_encoder_is_a_model_of_known_layers():
    model, ids = _bert()
    assert hooks_problems(model) == []
    kinds = {type(m) for m in model.modules() if any(p.requires_grad for p in m.parameters(recurse=False))}
    assert kinds == {nn.Embedding, nn.LayerNorm, nn.Linear}


@pytest.mark.parametrize("mode", ["max", "diff"])
@pytest.mark.parametrize("adaptive", [False, True], ids=["plain", "adaptive"])
@pytest.mark.parametrize("method", ["auto", "hooks"])
def test_bert_like_encoder_matches_the_loop_without_a_fallback(bert_reference, recwarn, method, adaptive, mode):
    model, ids = _bert()
    ref = bert_reference[adaptive]
    assert (ref["diff"].abs() > 10 * RTOL * ref["max"].abs()).all()  # the perturbation matters
    scores = saal_scores(model, ids, rho=RHO[adaptive], adaptive=adaptive, mode=mode, method=method, chunk_size=2)
    _close(scores, ref[mode])
    assert [str(w.message) for w in recwarn] == []  # in particular no "cannot score this model" fallback warning


class Bag(nn.Module):
    """Embedding cases beside BERT's: one embedding called twice (on the two halves of the ids), one with
    ``sparse=True``, one looked up with a single id per item ([N] -> [N, F]), ``padding_idx`` on two of them."""

    def __init__(self, sparse: bool = True) -> None:
        super().__init__()
        self.words = nn.Embedding(9, 5, padding_idx=0)
        self.sparse = nn.Embedding(9, 5, padding_idx=3, sparse=sparse)
        self.single = nn.Embedding(9, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        half = ids.shape[1] // 2
        tokens = torch.tanh(torch.cat([self.words(ids[:, :half]), self.words(ids[:, half:])], 1) + self.sparse(ids))
        return self.head(tokens.mean(1) + self.single(ids[:, 0]))


def _bag(sparse: bool = True) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = Bag(sparse).to(DTYPE)
    ids = torch.randint(0, 9, (4, 8), generator=torch.Generator().manual_seed(1))
    ids[:, -2:] = 0  # padding for `words`; id 3 (padding for `sparse`) also occurs
    assert (ids == 3).any()
    return model, ids


@pytest.mark.parametrize("mode", ["max", "diff"])
@pytest.mark.parametrize("adaptive", [False, True], ids=["plain", "adaptive"])
def test_embedding_cases_match_the_loop(recwarn, adaptive, mode):
    model, ids = _bag()
    dense_twin, _ = _bag(sparse=False)  # same weights; the loop takes dense gradients
    expected = reference_saal_scores(dense_twin, ids, RHO[adaptive], adaptive, mode)
    _close(saal_scores(model, ids, rho=RHO[adaptive], adaptive=adaptive, mode=mode, method="auto"), expected)
    assert [str(w.message) for w in recwarn] == []


def _gradient_norms(model: nn.Module, ids: torch.Tensor, adaptive: bool) -> torch.Tensor:
    """Per-item ||g|| (or || |w| g ||) from autograd, one item at a time."""
    params = [p for p in model.parameters() if p.requires_grad]
    norms = []
    for x in ids:
        logits = model(x.unsqueeze(0))
        grads = torch.autograd.grad(F.cross_entropy(logits, logits.argmax(1)), params)
        norms.append(torch.stack([((p.abs() * g) if adaptive else g).square().sum()
                                  for p, g in zip(params, grads, strict=True)]).sum().sqrt())
    return torch.stack(norms)


@pytest.mark.parametrize("adaptive", [False, True], ids=["plain", "adaptive"])
def test_padding_row_gets_zero_gradient_as_in_autograd(adaptive):
    """The first-order score is loss + rho ||g||, so it exposes the gradient norm. In the bag model the padding
    positions count (no attention mask hides them): with padding_idx the padding rows' (non-zero) weights get no
    gradient, exactly as autograd gives; without padding_idx they do, and the scores differ."""
    rho = 0.05
    model, ids = _bag(sparse=False)
    with torch.no_grad():
        for embedding in (model.words, model.sparse):
            embedding.weight[embedding.padding_idx].normal_()  # the forward reads these rows
    no_padding = copy.deepcopy(model)
    no_padding.words.padding_idx = no_padding.sparse.padding_idx = None
    for target in (model, no_padding):
        with torch.no_grad():
            logits = target(ids)
        clean = F.cross_entropy(logits, logits.argmax(1), reduction="none")
        norms = (saal_scores(target, ids, rho=rho, adaptive=adaptive, method="first_order") - clean) / rho
        _close(norms, _gradient_norms(target, ids, adaptive), rtol=1e-9)
    with_index = saal_scores(model, ids, rho=rho, adaptive=adaptive, method="first_order")
    without = saal_scores(no_padding, ids, rho=rho, adaptive=adaptive, method="first_order")
    assert ((with_index - without).abs() > 1e-6).all()


class SharedBatchOne(nn.Module):
    """A known layer on a batch-1 buffer whose output is summed over dim 0: one copy per item would change the
    outputs, so the hook engine must not expand it."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("prototype", torch.ones(1, 4))
        self.proj = nn.Linear(4, 3)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x) + self.proj(self.prototype).sum(0)


class SequenceFirst(nn.Module):
    """A linear layer on [tokens, batch, features]: its input is not batched along dim 0."""

    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(x.transpose(0, 1))).mean(0))


@pytest.mark.parametrize(("model_class", "shape", "match"), [
    (SharedBatchOne, (4, 4), "batch-1 input"),
    (SequenceFirst, (4, 5, 4), "not batched along dim 0"),
])
def test_what_hooks_find_at_run_time_makes_auto_fall_back(model_class, shape, match):
    torch.manual_seed(0)
    model = model_class().to(DTYPE).eval()
    x = torch.randn(*shape, dtype=DTYPE)
    with pytest.raises(HooksUnsupported, match=match):
        saal_scores(model, x, method="hooks")
    expected = reference_saal_scores(model, x, 0.05, True, "max")
    with pytest.warns(UserWarning, match=f"cannot score this model \\(.*{match}.*torch.func.*measured"):
        _close(saal_scores(model, x, adaptive=True, method="auto"), expected)


def test_embedding_with_max_norm_is_not_a_known_layer():
    model = nn.Sequential(nn.Embedding(6, 4, max_norm=1.0), nn.Flatten(), nn.Linear(8, 3)).to(DTYPE)
    problems = hooks_problems(model)
    assert problems == ["0 (Embedding) is an nn.Embedding with max_norm, scale_grad_by_freq or a custom forward"]


class FrozenBranch(nn.Module):
    """A known layer with trainable weights run under torch.no_grad inside the model (a frozen feature branch): no
    gradient reaches its weights, so its step is zero, as autograd and torch.func give."""

    def __init__(self) -> None:
        super().__init__()
        self.words = nn.Embedding(9, 4)
        self.frozen = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        tokens = self.words(ids)
        with torch.no_grad():
            context = self.frozen(tokens)
        return self.head(torch.tanh(tokens + context).mean(1))


@pytest.mark.parametrize("adaptive", [False, True], ids=["plain", "adaptive"])
def test_a_known_layer_run_under_no_grad_gets_no_step(adaptive):
    torch.manual_seed(0)
    model = FrozenBranch().to(DTYPE).eval()
    ids = torch.randint(0, 9, (4, 6), generator=torch.Generator().manual_seed(1))
    expected = saal_scores(model, ids, rho=RHO[adaptive], adaptive=adaptive, mode="diff", method="vmap")
    assert (expected.abs() > 1e-3).all()
    _close(saal_scores(model, ids, rho=RHO[adaptive], adaptive=adaptive, mode="diff", method="hooks"), expected,
           rtol=1e-10)
