"""LLaMA v1: RoPE, RMSNorm, SwiGLU with multi-head attention (every head has its own K and V).
The network is llama.py's; the config pins n_kv_heads to n_heads."""
from __future__ import annotations

from dataclasses import dataclass

from .llama import Llama, LlamaConfig


@dataclass
class Llama1Config(LlamaConfig):
    def __post_init__(self):
        if self.n_kv_heads not in (None, self.n_heads):
            raise ValueError("LLaMA v1 has no grouped-query attention: n_kv_heads must equal n_heads")
        self.n_kv_heads = self.n_heads
        super().__post_init__()


class Llama1(Llama):
    pass
