"""What a LLaMA computes inside: the residual stream after each block and each head's attention
probabilities, recomputed from the model's own modules (training/models/llama.py)."""
from __future__ import annotations

import math

import torch

from ..models.layers import apply_rope, default_positions


@torch.no_grad()
def residual_stream(model, tokens: torch.Tensor) -> list:
    """[embeddings, after block 1, ..., after block L], each [B, T, dim]."""
    positions = default_positions(tokens, None)
    cos, sin = model.rope_cos[positions].float(), model.rope_sin[positions].float()
    empty = torch.empty(0)
    x = model.tok_embeddings(tokens)
    out = [x]
    for layer in model.layers:
        x = layer(x, cos, sin, positions, empty, empty, None)
        out.append(x)
    return out


@torch.no_grad()
def attention_probs(model, tokens: torch.Tensor) -> list:
    """Per layer, [B, n_heads, T, T] causal attention probabilities."""
    stream = residual_stream(model, tokens)
    positions = default_positions(tokens, None)
    cos, sin = model.rope_cos[positions].float(), model.rope_sin[positions].float()
    B, T = tokens.shape
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    probs = []
    for layer, x in zip(model.layers, stream[:-1]):
        a = layer.attention
        h = layer.attention_norm(x)
        q = apply_rope(a.wq(h).view(B, T, a.n_heads, a.head_dim), cos, sin).transpose(1, 2)
        k = apply_rope(a.wk(h).view(B, T, a.n_kv_heads, a.head_dim), cos, sin).transpose(1, 2)
        k = k.repeat_interleave(a.n_heads // a.n_kv_heads, dim=1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(a.head_dim)
        probs.append(scores.masked_fill(~causal, float("-inf")).softmax(-1))
    return probs


@torch.no_grad()
def logit_lens(model, stream: list) -> list:
    """Per entry of the residual stream, the logits the final norm and classifier read from it."""
    return [model.output(model.norm(x)).float() for x in stream]
