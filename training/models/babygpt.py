"""BabyGPT: a GPT with learned positions, LayerNorm and a GELU MLP (Lin -> GELU -> Lin; the seed
put GELU after both linears), optional weight tying and biases. The seed's forward ran its whole
block stack once per layer; here each block runs once."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import attend, cache_mask, default_positions, init_weights, layer_cache


@dataclass
class GPTConfig:
    vocab_size: int = 109
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    context_length: int = 64
    dropout: float = 0.2
    bias: bool = True
    tie_embeddings: bool = False
    mlp_ratio: int = 4

    def __post_init__(self):
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not a multiple of n_heads {self.n_heads}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def to_dict(self) -> dict:
        return asdict(self)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_heads, self.head_dim, self.dropout = cfg.n_heads, cfg.head_dim, cfg.dropout
        self.wq = nn.Linear(cfg.dim, cfg.dim, bias=cfg.bias)
        self.wk = nn.Linear(cfg.dim, cfg.dim, bias=cfg.bias)
        self.wv = nn.Linear(cfg.dim, cfg.dim, bias=cfg.bias)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=cfg.bias)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        B, T = x.shape[0], x.shape[1]
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        y = attend(q, k, v, positions, k_cache, v_cache, mask,
                   self.dropout if self.training else 0.0)
        return self.wo(y)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.mlp_ratio * cfg.dim, bias=cfg.bias)
        self.w2 = nn.Linear(cfg.mlp_ratio * cfg.dim, cfg.dim, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.gelu(self.w1(x)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.dim, bias=cfg.bias)
        self.attention = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.dim, bias=cfg.bias)
        self.mlp = MLP(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        x = x + self.dropout(self.attention(self.ln1(x), positions, k_cache, v_cache, mask))
        return x + self.dropout(self.mlp(self.ln2(x)))


class BabyGPT(nn.Module):
    architecture = "gpt"

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos_embeddings = nn.Embedding(cfg.context_length, cfg.dim)
        self.dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layers)])
        self.norm = nn.LayerNorm(cfg.dim, bias=cfg.bias)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        init_weights(self, cfg.n_layers, residual_suffixes=("wo.weight", "w2.weight"))
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def forward(self, tokens: torch.Tensor, positions: Optional[torch.Tensor] = None,
                k_cache: Optional[torch.Tensor] = None,
                v_cache: Optional[torch.Tensor] = None) -> torch.Tensor:
        positions = default_positions(tokens, positions)
        mask = cache_mask(positions, k_cache)
        x = self.dropout(self.tok_embeddings(tokens) + self.pos_embeddings(positions))
        for i, layer in enumerate(self.layers):
            x = layer(x, positions, layer_cache(k_cache, i, x), layer_cache(v_cache, i, x), mask)
        return self.output(self.norm(x)).float()

    def export_metadata(self) -> dict:
        c = self.cfg
        return {"architecture": self.architecture, "vocab_size": c.vocab_size,
                "context_length": c.context_length, "n_layers": c.n_layers,
                "n_kv_heads": c.n_heads, "head_dim": c.head_dim, "cache_kind": "kv"}

    def flops_per_token(self) -> float:
        """PaLM appendix B: 6N (all parameters) + 12 * L * H * Q * T, forward and backward."""
        c = self.cfg
        n = sum(p.numel() for p in self.parameters())
        return 6 * n + 12 * c.n_layers * c.n_heads * c.head_dim * c.context_length
