"""LLaMA 2 style decoder: RoPE, RMSNorm, SwiGLU and grouped-query attention, with hidden size
rounded up to `multiple_of`. LLaMA v1 is the same network with n_kv_heads == n_heads (llama1.py).

forward(tokens, positions, k_cache, v_cache) is the artifact's calling convention
(docs/artifact-format.md); with no cache it runs plain causal attention for training.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import (RMSNorm, apply_rope, attend, cache_mask, default_positions, init_weights,
                     layer_cache, rope_tables)


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    dim: int = 288
    n_layers: int = 6
    n_heads: int = 6
    n_kv_heads: Optional[int] = None  # None: multi-head attention
    hidden_dim: Optional[int] = None  # None: 2/3 * 4 * dim rounded up to multiple_of
    multiple_of: int = 32
    norm_eps: float = 1e-5
    context_length: int = 256
    rope_theta: float = 10000.0
    dropout: float = 0.0
    tie_embeddings: bool = False

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not a multiple of n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if (self.dim // self.n_heads) % 2:
            raise ValueError("head_dim must be even for RoPE")
        if self.hidden_dim is None:
            hidden = int(2 * 4 * self.dim / 3)
            self.hidden_dim = self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def to_dict(self) -> dict:
        return asdict(self)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.dropout = cfg.dropout
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                positions: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                mask: Optional[torch.Tensor]) -> torch.Tensor:
        B, T = x.shape[0], x.shape[1]
        q = apply_rope(self.wq(x).view(B, T, self.n_heads, self.head_dim), cos, sin)
        k = apply_rope(self.wk(x).view(B, T, self.n_kv_heads, self.head_dim), cos, sin)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        y = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), positions,
                   k_cache, v_cache, mask, self.dropout if self.training else 0.0)
        return self.wo(y)


class FeedForward(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.w2 = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                positions: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                mask: Optional[torch.Tensor]) -> torch.Tensor:
        x = x + self.dropout(self.attention(self.attention_norm(x), cos, sin, positions,
                                            k_cache, v_cache, mask))
        return x + self.dropout(self.feed_forward(self.ffn_norm(x)))


class Llama(nn.Module):
    architecture = "llama"

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layers)])
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        init_weights(self, cfg.n_layers)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        cos, sin = rope_tables(cfg.head_dim, cfg.context_length, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, tokens: torch.Tensor, positions: Optional[torch.Tensor] = None,
                k_cache: Optional[torch.Tensor] = None,
                v_cache: Optional[torch.Tensor] = None) -> torch.Tensor:
        positions = default_positions(tokens, positions)
        cos = self.rope_cos[positions].float()
        sin = self.rope_sin[positions].float()
        mask = cache_mask(positions, k_cache)
        x = self.dropout(self.tok_embeddings(tokens))
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, positions, layer_cache(k_cache, i, x),
                      layer_cache(v_cache, i, x), mask)
        return self.output(self.norm(x)).float()

    def export_metadata(self) -> dict:
        c = self.cfg
        return {"architecture": self.architecture, "vocab_size": c.vocab_size,
                "context_length": c.context_length, "n_layers": c.n_layers,
                "n_kv_heads": c.n_kv_heads, "head_dim": c.head_dim, "cache_kind": "kv"}

    def flops_per_token(self) -> float:
        """PaLM appendix B: 6N + 12 * L * H * Q * T per token, forward and backward, with N all
        parameters and T the context length. (The input embedding is a lookup, so excluding it
        would be stricter by 6 * vocab * dim; benchmarks/train_mfu.py reports both.)"""
        c = self.cfg
        n = sum(p.numel() for p in self.parameters())
        return 6 * n + 12 * c.n_layers * c.n_heads * c.head_dim * c.context_length
