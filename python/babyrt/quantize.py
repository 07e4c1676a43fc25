"""int8 weight quantization: symmetric, one scale per output channel or per group of columns.

A quantized weight is an int8 [N, K] matrix q and scales [N, K / group] (fp32 or bf16), with
W ~= q * scale of its group. babyrt's ops (cpp/ops) take (q, scales) wherever they take a float
weight; torch.ops.babyrt.dequantize is the reference both sides compare against.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn as nn

from . import _C  # noqa: F401  (loads libbabyrt, which registers torch.ops.babyrt)

GROUP_SIZES = (32, 64, 128)
SCALE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class QuantConfig:
    group_size: Optional[int] = None  # None: one scale per output channel
    scale_dtype: str = "fp32"
    classifier: bool = True   # the output projection (the largest matrix of a small model)
    embedding: bool = False   # the token table (a tied table follows the classifier)

    def __post_init__(self):
        # babyrt export offers GROUP_SIZES; imported int8 (llama2.c v2) may bring another.
        if self.group_size is not None and (isinstance(self.group_size, bool) or
                                            not isinstance(self.group_size, int) or
                                            self.group_size < 1):
            raise ValueError(f"group_size must be a positive int or None (per channel), "
                             f"got {self.group_size!r}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"scale_dtype must be one of {sorted(SCALE_DTYPES)}, got {self.scale_dtype!r}")

    def metadata(self) -> dict:
        return {"scheme": "symmetric", "bits": 8, **asdict(self)}


def quantize_weight(w: torch.Tensor, group_size: Optional[int] = None,
                    scale_dtype: str = "fp32") -> tuple:
    """(q int8 [N, K], scales [N, K / group]) for a float matrix w [N, K]."""
    if w.dim() != 2:
        raise ValueError(f"can only quantize a matrix, got shape {tuple(w.shape)}")
    N, K = w.shape
    g = K if group_size is None else group_size
    if isinstance(g, bool) or not isinstance(g, int) or g < 1:
        raise ValueError(f"group size must be a positive int, got {g!r}")
    if K % g:
        raise ValueError(f"group size {g} does not divide the {K} columns of a {N}x{K} weight")
    wf = w.detach().float().reshape(N, K // g, g)
    scales = (wf.abs().amax(-1) / 127.0).clamp(min=1e-12).to(SCALE_DTYPES[scale_dtype])
    q = torch.round(wf / scales.float().unsqueeze(-1)).clamp(-127, 127).to(torch.int8)
    return q.reshape(N, K).contiguous(), scales.contiguous()


def dequantize(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return torch.ops.babyrt.dequantize(q, scales)


class Weight(nn.Module):
    """A weight as babyrt's ops take it: float (scales None), or int8 with its scales.
    Float weights are parameters, so that a runtime dtype change converts them; int8 weights and
    their scales are buffers, which it leaves alone."""

    def __init__(self, w: torch.Tensor, quant: Optional[QuantConfig] = None):
        super().__init__()
        if quant is None:
            self.weight = nn.Parameter(w.detach().clone(), requires_grad=False)
            self.scales = None
        else:
            q, s = quantize_weight(w, quant.group_size, quant.scale_dtype)
            self.register_buffer("weight", q)
            self.register_buffer("scales", s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.babyrt.linear(x, self.weight, self.scales, None)


class QuantizedLinear(nn.Module):
    """Drop-in for nn.Linear in the generic (non-fused) export path."""

    def __init__(self, linear: nn.Linear, quant: QuantConfig):
        super().__init__()
        self.w = Weight(linear.weight, quant)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(),
                                                                   requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.w(x)
        if self.bias is not None:
            y = y + self.bias
        return y


def quantize_linears(model: nn.Module, quant: QuantConfig, classifier_names=("output",)) -> nn.Module:
    """Replace the nn.Linear layers of `model` (in place) by QuantizedLinear; the classifier
    (named in classifier_names) only if quant.classifier."""
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear):
                continue
            if name in classifier_names and parent_name == "" and not quant.classifier:
                continue
            setattr(parent, name, QuantizedLinear(child, quant))
    return model
