"""Building blocks shared by the model family: norms, rotary embeddings, and attention that
either runs causally (training) or writes into and reads from the runtime's KV cache."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def rope_tables(head_dim: int, context_length: int, theta: float):
    """cos and sin of position * frequency, [context_length, head_dim / 2], float32."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
    angles = torch.outer(torch.arange(context_length).float(), freqs)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]), as Meta's and llama2.c's checkpoints expect.
    x: [B, T, H, D]; cos, sin: [B, T, D/2] in float32."""
    xf = x.float().reshape(x.shape[0], x.shape[1], x.shape[2], -1, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    c, s = cos.unsqueeze(2), sin.unsqueeze(2)
    out = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1)
    return out.flatten(3).type_as(x)


def cache_mask(positions: torch.Tensor, k_cache: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """None for plain causal attention (no cache); else [B, 1, T, S] with True where the query at
    position p may see cache slot s <= p. Slots past p are stale or empty."""
    if k_cache is None or k_cache.numel() == 0:
        return None
    slots = torch.arange(k_cache.shape[3], device=positions.device)
    return slots[None, None, None, :] <= positions[:, None, :, None]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
           k_cache: torch.Tensor, v_cache: torch.Tensor, mask: Optional[torch.Tensor],
           dropout: float) -> torch.Tensor:
    """q: [B, H, T, D]; k, v: [B, KV, T, D]. With a mask, k and v are written into the layer's
    cache at `positions` and attention runs over the whole cache. Returns [B, T, H * D]."""
    B, H, T, D = q.shape[0], q.shape[1], q.shape[2], q.shape[3]
    if mask is not None:
        index = positions[:, None, :, None].expand(B, k.shape[1], T, D)
        k_cache.scatter_(2, index, k.to(k_cache.dtype))
        v_cache.scatter_(2, index, v.to(v_cache.dtype))
        k, v = k_cache, v_cache
    n_rep = H // k.shape[1]
    if n_rep > 1:
        k = k.repeat_interleave(n_rep, dim=1)
        v = v.repeat_interleave(n_rep, dim=1)
    if mask is None:
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
    else:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
    return y.transpose(1, 2).reshape(B, T, H * D)


def layer_cache(cache: Optional[torch.Tensor], i: int, like: torch.Tensor) -> torch.Tensor:
    """Layer i's slice of the runtime's cache, or an empty tensor when there is none."""
    if cache is None or cache.numel() == 0:
        return torch.empty(0, device=like.device)
    return cache[i]


def default_positions(tokens: torch.Tensor, positions: Optional[torch.Tensor]) -> torch.Tensor:
    if positions is None:
        T = tokens.shape[1]
        return torch.arange(T, device=tokens.device).unsqueeze(0).expand(tokens.shape[0], T)
    return positions


def init_weights(model: nn.Module, n_layers: int, residual_suffixes=("wo.weight", "w2.weight")):
    """GPT-2 init: N(0, 0.02), residual projections scaled by 1/sqrt(2 * n_layers)."""
    import math

    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
    for name, p in model.named_parameters():
        if name.endswith(tuple(residual_suffixes)):
            nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layers))
