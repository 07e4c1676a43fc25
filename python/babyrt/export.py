"""Checkpoint directory -> artifact directory (TorchScript module + tokenizer.bin)."""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Optional, Union

import torch

from .artifact import artifact_size, write_artifact
from .quantize import QuantConfig, quantize_linears

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def inference_model(model: torch.nn.Module, dtype: str = "fp32",
                    quant: Optional[QuantConfig] = None) -> torch.nn.Module:
    """The module an artifact holds: LLaMAs become FusedLlama (babyrt's fused ops), the rest
    stay as trained; with quant, linear weights become int8 (quantized from the trained
    precision). Float parameters are then cast to dtype; buffers (RoPE tables, int8 weights,
    scales) keep their types."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    from .fused_llama import FusedLlama

    with torch.no_grad():
        if getattr(model, "architecture", None) == "llama":
            model = FusedLlama(model, quant)  # copies the weights
        else:
            model = copy.deepcopy(model).eval()  # the caller's model stays as it was
            if quant is not None:
                quantize_linears(model, quant)
        for p in model.parameters():
            p.requires_grad_(False)
            if p.is_floating_point():
                p.data = p.data.to(DTYPES[dtype])
    return model.eval()


def export_model(model: torch.nn.Module, tokenizer_info: dict, tokenizer_bin, out_dir,
                 dtype: str = "fp32", model_config: dict | None = None,
                 quant: Optional[QuantConfig] = None, exact_int8: Optional[dict] = None) -> Path:
    """Script `model` (through inference_model) and write it as an artifact. tokenizer_info
    carries kind, bos_id, eos_id and add_bos. exact_int8 ({weight module name: (int8, scales)})
    replaces quantized weights by given ones, e.g. those of an imported int8 checkpoint."""
    model = inference_model(model, dtype, quant)
    for name, (q, s) in (exact_int8 or {}).items():
        w = model.get_submodule(name)
        if w.weight.shape != q.shape or w.scales is None or w.scales.shape != s.shape:
            raise ValueError(f"{name}: int8 weight {tuple(q.shape)} / scales {tuple(s.shape)} "
                             "do not fit the model")
        w.weight.copy_(q)
        w.scales.copy_(s.to(w.scales.dtype))
    with torch.no_grad():
        scripted = torch.jit.script(model)
    metadata = {
        **model.export_metadata(),
        "dtype": dtype,
        "quantization": "int8" if quant is not None else "none",
        "bos_id": tokenizer_info["bos_id"],
        "eos_id": tokenizer_info["eos_id"],
        "add_bos": tokenizer_info["add_bos"],
        "tokenizer_kind": tokenizer_info["kind"],
    }
    if quant is not None:
        metadata["quantization_config"] = quant.metadata()
    if model_config is not None:
        metadata["model_config"] = model_config
    return write_artifact(out_dir, scripted, metadata, tokenizer_bin)


def export_checkpoint(ckpt_dir: Union[str, os.PathLike], out_dir: Union[str, os.PathLike],
                      dtype: str = "fp32", quant: Optional[QuantConfig] = None) -> dict:
    """Export a checkpoint directory left by `babyrt train`. Returns the path and its size."""
    from .training.trainer import load_checkpoint

    model, config = load_checkpoint(ckpt_dir)
    if config["model"] == "babygpt-lora":
        from .training.models import merge_lora
        model = merge_lora(model)  # the artifact is a plain BabyGPT with W + (alpha/r) B A
    out = export_model(model, config["tokenizer"], Path(ckpt_dir) / "tokenizer.bin", out_dir,
                       dtype=dtype, quant=quant,
                       model_config={"model": config["model"], **config["model_config"]})
    return {"path": str(out), "bytes": artifact_size(out)}
