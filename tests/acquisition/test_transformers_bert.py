"""A real Hugging Face ``BertForSequenceClassification`` (a tiny config, no download) on the hook engine, against the
float64 one-item loop. Skipped unless ``transformers`` is installed; it is not a dependency of this package.

The torch.func fallback cannot score this model at all (transformers 5.24: its mask helpers branch on tensor values,
which vmap refuses), so the fast path is the only exact one for it.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from benchmarks.reference_loop import reference_saal_scores
from saal_lightning.acquisition.per_sample_hooks import hooks_problems
from saal_lightning.acquisition.saal_score import saal_scores

transformers = pytest.importorskip("transformers")

RTOL = 1e-4
DTYPE = torch.float64
RHO = {False: 0.05, True: 0.5}
PAD = 0


class Logits(nn.Module):
    """``input_ids -> logits``, with the attention mask a tokenizer would give (non-padding positions)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=(input_ids != PAD).long()).logits


def _model(attention: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=12, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16,
        max_position_embeddings=12, num_labels=3, pad_token_id=PAD, attn_implementation=attention,
        initializer_range=0.5,  # logits of order 1 (the default 0.02 makes every item's scores nearly equal)
    )
    model = Logits(transformers.BertForSequenceClassification(config)).to(DTYPE).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.add_(0.3 * torch.randn_like(module.weight))
                module.bias.add_(0.3 * torch.randn_like(module.bias))
    ids = torch.randint(PAD + 2, 12, (5, 10), generator=torch.Generator().manual_seed(1))
    ids[:, 0] = 1  # [CLS]
    ids[1:, 7:] = PAD
    ids[2, 4:] = PAD
    return model, ids


@pytest.mark.parametrize("adaptive", [False, True], ids=["plain", "adaptive"])
@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_hugging_face_bert_matches_the_loop_on_the_hook_engine(recwarn, attention, adaptive):
    model, ids = _model(attention)
    assert hooks_problems(model) == []
    for mode in ("max", "diff"):
        expected = reference_saal_scores(model, ids, RHO[adaptive], adaptive, mode)
        if mode == "diff":
            assert (expected.abs() > 1e-3).all()  # the perturbation matters
        scores = saal_scores(model, ids, rho=RHO[adaptive], adaptive=adaptive, mode=mode, chunk_size=2)
        assert ((scores - expected).abs() / expected.abs()).max().item() < RTOL
    assert [str(w.message) for w in recwarn if "saal_scores" in str(w.message)] == []
