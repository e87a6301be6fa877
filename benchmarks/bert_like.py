"""A BERT-style text classifier, built module by module as Hugging Face ``transformers`` builds
``BertForSequenceClassification`` (``transformers/models/bert/modeling_bert.py``), without the dependency.

Word, position and token-type ``nn.Embedding`` (the word embedding with ``padding_idx``), summed and put through
``nn.LayerNorm``; encoder layers of multi-head self-attention (``nn.Linear`` query, key, value and output on
``[batch, tokens, features]``, attention as matmul + softmax with an additive padding mask), a GELU feed-forward
block, residual connections each followed by ``nn.LayerNorm``; a pooler (``nn.Linear`` + tanh on the first, [CLS],
token) and a linear classifier. Dropout layers are there as in BERT (inactive in eval mode). As in Hugging Face, the
position ids are a ``[1, max_positions]`` buffer sliced to the sequence length, so the position embedding is looked
up once and broadcast over the batch, and the token-type ids default to zeros expanded to the batch.

The SAAL tests score it against the one-item-at-a-time loop, and ``benchmarks/acquisition.py`` times it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

CLS_TOKEN = 1  # every sequence starts with it, as a tokenizer's [CLS]


@dataclass(frozen=True)
class BertLikeConfig:
    """The ``BertConfig`` fields the model uses (Hugging Face's names and meanings)."""

    vocab_size: int = 30
    hidden_size: int = 16
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    intermediate_size: int = 32
    max_position_embeddings: int = 16
    type_vocab_size: int = 2
    pad_token_id: int = 0
    num_labels: int = 3
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1


class BertEmbeddings(nn.Module):
    def __init__(self, config: BertLikeConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.register_buffer("position_ids", torch.arange(config.max_position_embeddings).expand((1, -1)),
                             persistent=False)
        self.register_buffer("token_type_ids", torch.zeros(1, config.max_position_embeddings, dtype=torch.long),
                             persistent=False)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        batch_size, seq_length = input_ids.shape
        position_ids = self.position_ids[:, :seq_length]  # [1, T]: one lookup, broadcast over the batch
        if token_type_ids is None:
            token_type_ids = self.token_type_ids[:, :seq_length].expand(batch_size, seq_length)
        embeddings = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        embeddings = embeddings + self.position_embeddings(position_ids)
        return self.dropout(self.LayerNorm(embeddings))


class BertSelfAttention(nn.Module):
    def __init__(self, config: BertLikeConfig) -> None:
        super().__init__()
        self.num_attention_heads = config.num_attention_heads
        self.attention_head_size = config.hidden_size // config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        shape = (*hidden_states.shape[:-1], self.num_attention_heads, self.attention_head_size)
        query, key, value = (layer(hidden_states).view(shape).transpose(1, 2)
                             for layer in (self.query, self.key, self.value))  # [B, heads, T, head size]
        scores = torch.matmul(query, key.transpose(2, 3)) / math.sqrt(self.attention_head_size) + attention_mask
        probs = self.dropout(torch.softmax(scores, dim=-1))
        context = torch.matmul(probs, value).transpose(1, 2).contiguous()
        return context.reshape(*hidden_states.shape[:-1], -1)


class BertSelfOutput(nn.Module):
    def __init__(self, config: BertLikeConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + input_tensor)


class BertAttention(nn.Module):
    def __init__(self, config: BertLikeConfig) -> None:
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(hidden_states, attention_mask), hidden_states)


class BertIntermediate(nn.Module):
    def __init__(self, config: BertLikeConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.intermediate_act_fn = nn.GELU()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.intermediate_act_fn(self.dense(hidden_states))


class BertOutput(nn.Module):
    def __init__(self, config: BertLikeConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + input_tensor)


class BertLayer(nn.Module):
    def __init__(self, config: BertLikeConfig) -> None:
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        attention_output = self.attention(hidden_states, attention_mask)
        return self.output(self.intermediate(attention_output), attention_output)


class BertEncoder(nn.Module):
    def __init__(self, config: BertLikeConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList([BertLayer(config) for _ in range(config.num_hidden_layers)])

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            hidden_states = layer(hidden_states, attention_mask)
        return hidden_states


class BertPooler(nn.Module):
    def __init__(self, config: BertLikeConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = nn.Tanh()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.activation(self.dense(hidden_states[:, 0]))  # the first ([CLS]) token


class BertModel(nn.Module):
    def __init__(self, config: BertLikeConfig) -> None:
        super().__init__()
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        embeddings = self.embeddings(input_ids)
        # Hugging Face's extended mask: 0 where attended, the dtype's minimum at padding keys, [B, 1, 1, T].
        keep = attention_mask[:, None, None, :].to(embeddings.dtype)
        extended = (1.0 - keep) * torch.finfo(embeddings.dtype).min
        return self.pooler(self.encoder(embeddings, extended))


class BertLikeForSequenceClassification(nn.Module):
    """``input_ids`` ([batch, tokens], padded with ``pad_token_id``) -> logits [batch, num_labels]; the attention
    mask is the non-padding positions, as a tokenizer would return it."""

    def __init__(self, config: BertLikeConfig | None = None) -> None:
        super().__init__()
        self.config = config or BertLikeConfig()
        self.bert = BertModel(self.config)
        self.dropout = nn.Dropout(self.config.hidden_dropout_prob)
        self.classifier = nn.Linear(self.config.hidden_size, self.config.num_labels)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        pooled = self.bert(input_ids, attention_mask=input_ids != self.config.pad_token_id)
        return self.classifier(self.dropout(pooled))


def random_token_ids(n: int, seq_length: int, config: BertLikeConfig, generator: torch.Generator,
                     min_length: int = 2) -> torch.Tensor:
    """[n, seq_length] ids: [CLS], then random non-special tokens up to a random length, then padding."""
    ids = torch.randint(CLS_TOKEN + 1, config.vocab_size, (n, seq_length), generator=generator)
    ids[:, 0] = CLS_TOKEN
    lengths = torch.randint(min_length, seq_length + 1, (n,), generator=generator)
    ids[torch.arange(seq_length) >= lengths.unsqueeze(1)] = config.pad_token_id
    return ids


def keyword_task(n: int, seq_length: int, config: BertLikeConfig,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A learnable synthetic task: the label is the class whose keyword (token ids 2 .. num_labels + 1) occurs most
    often among random tokens, so the model must attend over the sequence. Returns (ids, labels)."""
    ids = random_token_ids(n, seq_length, config, generator, min_length=seq_length // 2)
    labels = torch.randint(0, config.num_labels, (n,), generator=generator)
    keywords = CLS_TOKEN + 1 + torch.arange(config.num_labels)
    ids[torch.isin(ids, keywords)] = config.num_labels + CLS_TOKEN + 1  # no keyword by chance
    for i in range(n):
        length = int((ids[i] != config.pad_token_id).sum())
        positions = 1 + torch.randperm(length - 1, generator=generator)[:3]
        ids[i, positions] = keywords[labels[i]]
    return ids, labels
