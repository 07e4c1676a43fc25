"""LLaMA 2 style decoder: RoPE, RMSNorm, SwiGLU and grouped-query attention.

One module serves training and export. forward(tokens, positions, k_cache, v_cache):
  tokens, positions: int64 [B, T]; positions index the cache.
  k_cache, v_cache:  [n_layers, B, n_kv_heads, context_length, head_dim], owned by the caller
                     and updated in place; empty tensors (or None) for plain causal training.
  returns float32 logits [B, T, vocab_size].
There is no host synchronisation and no Python int derived from tensor values, so the
scripted module can be captured in a CUDA graph.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


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


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]), as Meta's and llama2.c's checkpoints expect.
    x: [B, T, H, D]; cos, sin: [B, T, D/2] in float32."""
    xf = x.float().reshape(x.shape[0], x.shape[1], x.shape[2], -1, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    c, s = cos.unsqueeze(2), sin.unsqueeze(2)
    out = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1)
    return out.flatten(3).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads
        self.head_dim = cfg.head_dim
        self.n_rep = cfg.n_heads // cfg.n_kv_heads
        self.dropout = cfg.dropout
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                positions: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                mask: Optional[torch.Tensor]) -> torch.Tensor:
        B, T = x.shape[0], x.shape[1]
        q = apply_rope(self.wq(x).view(B, T, self.n_heads, self.head_dim), cos, sin).transpose(1, 2)
        k = apply_rope(self.wk(x).view(B, T, self.n_kv_heads, self.head_dim), cos, sin).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if mask is not None:
            # Write this step's keys and values at their positions, then attend over the cache.
            index = positions[:, None, :, None].expand(B, self.n_kv_heads, T, self.head_dim)
            k_cache.scatter_(2, index, k.to(k_cache.dtype))
            v_cache.scatter_(2, index, v.to(v_cache.dtype))
            k, v = k_cache, v_cache
        if self.n_rep > 1:
            k = k.repeat_interleave(self.n_rep, dim=1)
            v = v.repeat_interleave(self.n_rep, dim=1)
        p = self.dropout if self.training else 0.0
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        return self.wo(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


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
        self.context_length = cfg.context_length
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layers)])
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        freqs = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2).float() / cfg.head_dim))
        angles = torch.outer(torch.arange(cfg.context_length).float(), freqs)
        self.register_buffer("rope_cos", angles.cos(), persistent=False)
        self.register_buffer("rope_sin", angles.sin(), persistent=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of residual projections
            if name.endswith(("wo.weight", "w2.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init_weights(m: nn.Module):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def forward(self, tokens: torch.Tensor, positions: Optional[torch.Tensor] = None,
                k_cache: Optional[torch.Tensor] = None,
                v_cache: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, T = tokens.shape[0], tokens.shape[1]
        if positions is None:
            positions = torch.arange(T, device=tokens.device).unsqueeze(0).expand(B, T)
        cos = self.rope_cos[positions].float()
        sin = self.rope_sin[positions].float()
        x = self.dropout(self.tok_embeddings(tokens))
        mask: Optional[torch.Tensor] = None
        if k_cache is not None and v_cache is not None and k_cache.numel() > 0:
            # Query at position p sees cache slots 0..p; slots past it are stale or empty.
            slots = torch.arange(k_cache.shape[3], device=tokens.device)
            mask = (slots[None, None, None, :] <= positions[:, None, :, None])
            for i, layer in enumerate(self.layers):
                x = layer(x, cos, sin, positions, k_cache[i], v_cache[i], mask)
        else:
            empty = torch.empty(0, device=tokens.device)
            for layer in self.layers:
                x = layer(x, cos, sin, positions, empty, empty, mask)
        return self.output(self.norm(x)).float()

    def export_metadata(self) -> dict:
        """The architecture fields of the artifact metadata."""
        c = self.cfg
        return {"architecture": self.architecture, "vocab_size": c.vocab_size,
                "context_length": c.context_length, "n_layers": c.n_layers,
                "n_kv_heads": c.n_kv_heads, "head_dim": c.head_dim, "cache_kind": "kv"}
