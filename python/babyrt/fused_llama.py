"""The exported form of a LLaMA: the same network as training/models/llama.py, written with
babyrt's fused ops (cpp/ops) so that a decode step is 2 op calls per layer instead of ~30:

    x   = attention_block(x, attention_norm, Wqkv, positions, rope, k/v cache, Wo)
            # = attention_linear(rmsnorm_linear(x, attention_norm, Wqkv), positions, rope,
            #                    k/v cache, Wo, residual=x): q, k, v in one GEMV; RoPE, cache
            #   write and attention; Wo (CUDA: three kernels, or two with
            #   BABYRT_ATTN_LINEAR=1)
    x   = ffn_block(x, ffn_norm, W13, W2)
            # = swiglu_linear(rmsnorm_linear(x, ffn_norm, W13), W2, residual=x): gate and up
            #   in one GEMV, then SwiGLU and W2 (CUDA: two kernels)

On CUDA, a decode step of one sequence first offers itself to decode_step, the whole step as
one kernel (cpp/ops/cuda_decode_step.cu; opt-in with BABYRT_DECODE_STEP=1, not yet faster);
where that declines, the layers run op by op as above.

Weights are float, or int8 with scales (quantize.py). The artifact's calling convention is
unchanged (docs/artifact-format.md); the parity tests hold it to the training model. Artifacts
exported before attention_block and ffn_block (rmsnorm_linear then attention_linear, or
attention then linear; rmsnorm_linear then swiglu_linear) still load: every op they call stays.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn as nn

from .quantize import QuantConfig, Weight
from .training.models.layers import rope_tables


# The one definition of the fused layout: each matrix of a FusedBlock is these training
# matrices (training/models/llama.py names, within a block) stacked row-wise, in this order.
FUSED_WEIGHTS = {"wqkv": ("attention.wq", "attention.wk", "attention.wv"),
                 "wo": ("attention.wo",),
                 "w13": ("feed_forward.w1", "feed_forward.w3"),
                 "w2": ("feed_forward.w2",)}


class FusedBlock(nn.Module):
    def __init__(self, block, cfg, quant: Optional[QuantConfig]):
        super().__init__()
        self.attention_norm = nn.Parameter(block.attention_norm.weight.detach().clone(),
                                           requires_grad=False)
        self.ffn_norm = nn.Parameter(block.ffn_norm.weight.detach().clone(), requires_grad=False)
        for fused, parts in FUSED_WEIGHTS.items():
            setattr(self, fused, Weight(torch.cat([block.get_submodule(n).weight for n in parts]),
                                        quant))
        self.eps = float(cfg.norm_eps)
        self.n_heads, self.n_kv_heads = cfg.n_heads, cfg.n_kv_heads

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        x = torch.ops.babyrt.attention_block(x, self.attention_norm, self.eps, self.wqkv.weight,
                                             self.wqkv.scales, positions, cos, sin, k_cache,
                                             v_cache, self.n_heads, self.n_kv_heads,
                                             self.wo.weight, self.wo.scales)
        return torch.ops.babyrt.ffn_block(x, self.ffn_norm, self.eps, self.w13.weight,
                                          self.w13.scales, self.w2.weight, self.w2.scales)


class FusedLlama(nn.Module):
    """Built from a trained Llama (any dtype); quant=None keeps the weights float."""

    def __init__(self, model, quant: Optional[QuantConfig] = None):
        super().__init__()
        c = model.cfg
        self.n_layers, self.n_heads, self.n_kv_heads = c.n_layers, c.n_heads, c.n_kv_heads
        self.head_dim = c.head_dim
        self.context_length, self.eps = c.context_length, float(c.norm_eps)
        self.layers = nn.ModuleList([FusedBlock(b, c, quant) for b in model.layers])
        self.norm = nn.Parameter(model.norm.weight.detach().clone(), requires_grad=False)
        q_out = quant if quant is not None and quant.classifier else None
        self.output = Weight(model.output.weight, q_out)
        if model.output.weight is model.tok_embeddings.weight:
            self.tok_embeddings = self.output  # tied: one table (float or int8) serves both ends
        else:
            q_emb = quant if quant is not None and quant.embedding else None
            self.tok_embeddings = Weight(model.tok_embeddings.weight, q_emb)
        # RoPE tables stay fp32 whatever the weights' dtype.
        cos, sin = rope_tables(c.head_dim, c.context_length, c.rope_theta)
        self.register_buffer("rope_cos", cos)
        self.register_buffer("rope_sin", sin)
        self.architecture = model.architecture
        self._metadata = model.export_metadata()

    def export_metadata(self) -> dict:
        return dict(self._metadata)

    def step_tensors(self) -> Tuple[List[torch.Tensor], List[Optional[torch.Tensor]]]:
        """The weights and scales lists of babyrt::decode_step (their order: cpp/ops/ops.h)."""
        weights = [self.tok_embeddings.weight, self.norm, self.output.weight]
        scales: List[Optional[torch.Tensor]] = []
        scales.append(self.tok_embeddings.scales)  # one at a time: TorchScript types None apart
        scales.append(self.output.scales)
        for layer in self.layers:
            weights.extend([layer.attention_norm, layer.ffn_norm, layer.wqkv.weight,
                            layer.wo.weight, layer.w13.weight, layer.w2.weight])
            for w in (layer.wqkv, layer.wo, layer.w13, layer.w2):
                scales.append(w.scales)
        return weights, scales

    def forward(self, tokens: torch.Tensor, positions: Optional[torch.Tensor] = None,
                k_cache: Optional[torch.Tensor] = None,
                v_cache: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, T = tokens.shape[0], tokens.shape[1]
        if (tokens.is_cuda and B == 1 and T == 1 and positions is not None and k_cache is not None
                and v_cache is not None and k_cache.numel() > 0):
            # A decode step as one kernel where one covers it (empty logits: it does not).
            weights, scales = self.step_tensors()
            logits = torch.ops.babyrt.decode_step(tokens, positions, weights, scales, self.rope_cos,
                                                  self.rope_sin, k_cache, v_cache, self.n_heads,
                                                  self.n_kv_heads, self.eps)
            if logits.numel() > 0:
                return logits
        if positions is None:
            positions = torch.arange(T, device=tokens.device).unsqueeze(0).expand(B, T)
        x = torch.ops.babyrt.embedding(tokens, self.tok_embeddings.weight,
                                       self.tok_embeddings.scales, self.norm.dtype)
        if k_cache is None or v_cache is None or k_cache.numel() == 0:
            # No runtime cache (a plain forward from Python): a scratch one gives causal attention.
            shape = [self.n_layers, B, self.n_kv_heads, self.context_length, self.head_dim]
            k_cache = torch.zeros(shape, dtype=x.dtype, device=x.device)
            v_cache = torch.zeros(shape, dtype=x.dtype, device=x.device)
        for i, layer in enumerate(self.layers):
            x = layer(x, positions, self.rope_cos, self.rope_sin, k_cache[i], v_cache[i])
        # fp32 logits straight from the classifier GEMV (no separate cast kernel on CUDA).
        return torch.ops.babyrt.rmsnorm_linear(x, self.norm, self.eps, self.output.weight,
                                               self.output.scales, torch.float32)


def training_state_dict(module) -> tuple:
    """(state dict in training/models/llama.py's layout, fp32 with int8 dequantized; whether the
    classifier shares the embedding) of a loaded LLaMA artifact module, fused or not."""
    sd = module.state_dict()
    shared = module.tok_embeddings.weight.data_ptr() == module.output.weight.data_ptr()
    if "layers.0.wqkv.weight" not in sd:  # an artifact from before FusedLlama
        return {k: v.float() for k, v in sd.items()}, shared

    def weight(prefix: str) -> torch.Tensor:
        w, s = sd[prefix + ".weight"], sd.get(prefix + ".scales")
        return torch.ops.babyrt.dequantize(w, s) if s is not None else w.float()

    dim, kv_rows = sd["norm"].shape[0], module.n_kv_heads * module.head_dim
    hidden = sd["layers.0.w13.weight"].shape[0] // 2
    rows = {"attention.wq": dim, "attention.wk": kv_rows, "attention.wv": kv_rows,
            "attention.wo": dim, "feed_forward.w1": hidden, "feed_forward.w3": hidden,
            "feed_forward.w2": dim}
    out = {"tok_embeddings.weight": weight("tok_embeddings"), "norm.weight": sd["norm"].float(),
           "output.weight": weight("output")}
    for i in range(module.n_layers):
        p = f"layers.{i}."
        for fused, parts in FUSED_WEIGHTS.items():
            pieces = weight(p + fused).split([rows[n] for n in parts])
            out.update({f"{p}{n}.weight": w for n, w in zip(parts, pieces)})
        for norm in ("attention_norm", "ffn_norm"):
            out[f"{p}{norm}.weight"] = sd[p + norm].float()
    return out, shared
