"""LoRA (Hu et al. 2021) for BabyGPT: the base weights are frozen and each adapted projection
learns a low-rank update, y = W x + (alpha / r) * B A x, with A random and B zero at the start.
At export the adapters are merged into W, so the artifact is a plain BabyGPT.

The seed's "LoRA" was a different network (rank-4 attention with no base weights); this is the
real thing."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from .babygpt import BabyGPT

TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2")


@dataclass
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple = TARGETS

    def __post_init__(self):
        self.targets = tuple(self.targets)
        if self.rank < 1:
            raise ValueError("LoRA rank must be >= 1")
        unknown = set(self.targets) - set(TARGETS)
        if unknown:
            raise ValueError(f"unknown LoRA targets {sorted(unknown)}; choose from {TARGETS}")

    def to_dict(self) -> dict:
        return {**asdict(self), "targets": list(self.targets)}


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, cfg: LoRAConfig):
        super().__init__()
        self.base = base
        self.lora_a = nn.Parameter(torch.empty(cfg.rank, base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, cfg.rank))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.scale = cfg.alpha / cfg.rank
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (self.dropout(x) @ self.lora_a.t() @ self.lora_b.t()) * self.scale

    def merged(self) -> nn.Linear:
        out = nn.Linear(self.base.in_features, self.base.out_features,
                        bias=self.base.bias is not None)
        with torch.no_grad():
            out.weight.copy_(self.base.weight + self.scale * self.lora_b @ self.lora_a)
            if self.base.bias is not None:
                out.bias.copy_(self.base.bias)
        return out


def add_lora(model: BabyGPT, cfg: LoRAConfig) -> BabyGPT:
    """Freeze every base parameter and wrap the target projections in adapters (in place)."""
    for p in model.parameters():
        p.requires_grad_(False)
    for block in model.layers:
        for parent in (block.attention, block.mlp):
            for name in cfg.targets:
                if isinstance(getattr(parent, name, None), nn.Linear):
                    setattr(parent, name, LoRALinear(getattr(parent, name), cfg))
    return model


def merge_lora(model: BabyGPT) -> BabyGPT:
    """Replace every adapter by its merged Linear (in place); the result is a plain BabyGPT."""
    for block in model.layers:
        for parent in (block.attention, block.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, LoRALinear):
                    setattr(parent, name, child.merged())
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def trainable_parameters(model: nn.Module) -> tuple:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total
