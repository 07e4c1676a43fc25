"""Bigram and n-gram models. Both are stateless: the artifact's cache kind is "window", and the
runtime feeds the last context_length (= n - 1) tokens at every step.

- Bigram: a next-token table, logits = table[token].
- NGram: an MLP over the concatenated embeddings of the last n - 1 tokens (Bengio et al. 2003).
  Positions before the start of the text use a padding embedding. The seed skipped token i-1 and
  applied log_softmax before the loss; this one uses tokens i-n+2..i and returns raw logits.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn as nn


@dataclass
class BigramConfig:
    vocab_size: int = 109
    context_length: int = 1

    def __post_init__(self):
        if self.context_length != 1:
            raise ValueError("a bigram model sees exactly one token: context_length must be 1")

    def to_dict(self) -> dict:
        return asdict(self)


class Bigram(nn.Module):
    architecture = "bigram"

    def __init__(self, cfg: BigramConfig):
        super().__init__()
        self.cfg = cfg
        self.table = nn.Embedding(cfg.vocab_size, cfg.vocab_size)
        nn.init.zeros_(self.table.weight)

    def forward(self, tokens: torch.Tensor, positions: Optional[torch.Tensor] = None,
                k_cache: Optional[torch.Tensor] = None,
                v_cache: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.table(tokens).float()

    def export_metadata(self) -> dict:
        return {"architecture": self.architecture, "vocab_size": self.cfg.vocab_size,
                "context_length": 1, "n_layers": 0, "n_kv_heads": 0, "head_dim": 0,
                "cache_kind": "window"}

    def flops_per_token(self) -> float:
        return 0.0  # a table lookup


@dataclass
class NGramConfig:
    vocab_size: int = 109
    n: int = 3
    emb_dim: int = 100
    hidden_dim: int = 128
    dropout: float = 0.0

    def __post_init__(self):
        if self.n < 2:
            raise ValueError("an n-gram model needs n >= 2")

    @property
    def context_length(self) -> int:
        return self.n - 1

    def to_dict(self) -> dict:
        return asdict(self)


class NGram(nn.Module):
    architecture = "ngram"

    def __init__(self, cfg: NGramConfig):
        super().__init__()
        self.cfg = cfg
        self.window = cfg.n - 1
        self.pad_id = cfg.vocab_size  # an extra embedding row for "before the text"
        self.embedding = nn.Embedding(cfg.vocab_size + 1, cfg.emb_dim)
        self.hidden = nn.Linear(self.window * cfg.emb_dim, cfg.hidden_dim)
        self.output = nn.Linear(cfg.hidden_dim, cfg.vocab_size)
        self.dropout = nn.Dropout(cfg.dropout)
        for m in (self.embedding, self.hidden, self.output):
            nn.init.normal_(m.weight, std=0.02)

    def forward(self, tokens: torch.Tensor, positions: Optional[torch.Tensor] = None,
                k_cache: Optional[torch.Tensor] = None,
                v_cache: Optional[torch.Tensor] = None) -> torch.Tensor:
        T = tokens.shape[1]
        pad = torch.full((tokens.shape[0], self.window - 1), self.pad_id, dtype=tokens.dtype,
                         device=tokens.device)
        padded = torch.cat([pad, tokens], dim=1)
        # Position t sees tokens t - window + 1 .. t.
        parts = [self.embedding(padded[:, i:i + T]) for i in range(self.window)]
        h = torch.tanh(self.hidden(self.dropout(torch.cat(parts, dim=-1))))
        return self.output(self.dropout(h)).float()

    def export_metadata(self) -> dict:
        return {"architecture": self.architecture, "vocab_size": self.cfg.vocab_size,
                "context_length": self.window, "n_layers": 0, "n_kv_heads": 0, "head_dim": 0,
                "cache_kind": "window"}

    def flops_per_token(self) -> float:
        n = self.hidden.weight.numel() + self.output.weight.numel()
        return 6 * n
