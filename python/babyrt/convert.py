"""Conversions between babyrt and llama2.c (checkpoints v0 and v1, tokenizer.bin from a
sentencepiece model).

llama2.c layouts (fp32, little-endian), as karpathy's export.py writes them:
  v0 "legacy": int32 dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len
      (vocab_size < 0: the classifier is not shared with the embedding), then
      token_embedding, attention norms, wq, wk, wv, wo (all layers each), ffn norms, w1, w2, w3,
      final norm, freq_cis_real, freq_cis_imag [seq_len, head_dim / 2], and wcls if not shared.
  v1: a 256-byte header: uint32 magic "ak42", int32 version 1, the 7 ints above
      (vocab_size positive), uint8 shared_classifier, zero padding; then attention norms, ffn
      norms, final norm, token_embedding, wq, wk, wv, wo, w1, w2, w3, and wcls if not shared.
Weights are nn.Linear (out, in) matrices, rows contiguous. Sizes in the header are checked
against the file size before anything is allocated.
"""
from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Union

import numpy as np
import torch

from .artifact import read_metadata
from .export import export_model
from .training.models import Llama, LlamaConfig

PathLike = Union[str, os.PathLike]
MAGIC = 0x616B3432  # "ak42"
V1_HEADER = 256


class ConversionError(ValueError):
    pass


def _layer_names(n_layers: int, suffix: str):
    return [f"layers.{i}.{suffix}" for i in range(n_layers)]


def _order(cfg: LlamaConfig, version: int, shared: bool) -> list:
    """State-dict names in file order (lists are concatenated over layers)."""
    L = cfg.n_layers
    att, ffn = _layer_names(L, "attention_norm.weight"), _layer_names(L, "ffn_norm.weight")
    mats = [_layer_names(L, f"attention.{w}.weight") for w in ("wq", "wk", "wv", "wo")]
    mats += [_layer_names(L, f"feed_forward.{w}.weight") for w in ("w1", "w2", "w3")]
    mats = [n for group in mats for n in group]
    if version == 0:
        order = ["tok_embeddings.weight", *att, *mats[:4 * L], *ffn, *mats[4 * L:],
                 "norm.weight", "freq_cis_real", "freq_cis_imag"]
    else:
        order = [*att, *ffn, "norm.weight", "tok_embeddings.weight", *mats]
    return order + ([] if shared else ["output.weight"])


def _shapes(cfg: LlamaConfig) -> dict:
    d, h, kv, hd = cfg.dim, cfg.hidden_dim, cfg.n_kv_heads * cfg.head_dim, cfg.head_dim
    shapes = {"tok_embeddings.weight": (cfg.vocab_size, d), "output.weight": (cfg.vocab_size, d),
              "norm.weight": (d,), "freq_cis_real": (cfg.context_length, hd // 2),
              "freq_cis_imag": (cfg.context_length, hd // 2)}
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        shapes.update({p + "attention_norm.weight": (d,), p + "ffn_norm.weight": (d,),
                       p + "attention.wq.weight": (d, d), p + "attention.wk.weight": (kv, d),
                       p + "attention.wv.weight": (kv, d), p + "attention.wo.weight": (d, d),
                       p + "feed_forward.w1.weight": (h, d), p + "feed_forward.w2.weight": (d, h),
                       p + "feed_forward.w3.weight": (h, d)})
    return shapes


def read_llama2c(path: PathLike):
    """(LlamaConfig, state_dict, version) from a llama2.c checkpoint, validated against its size."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: no such checkpoint")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(V1_HEADER)
    if len(head) < 28:
        raise ConversionError(f"{path}: {size} bytes, too short for a llama2.c header (28 bytes)")
    if struct.unpack_from("<I", head)[0] == MAGIC:
        if len(head) < V1_HEADER:
            raise ConversionError(f"{path}: truncated v1 header ({size} of {V1_HEADER} bytes)")
        version = struct.unpack_from("<i", head, 4)[0]
        if version != 1:
            raise ConversionError(f"{path}: llama2.c format version {version} is not supported "
                                  "(babyrt reads v0 and v1)")
        dims = struct.unpack_from("<7i", head, 8)
        shared = bool(head[36])
        offset = V1_HEADER
    else:
        version, dims, offset = 0, struct.unpack_from("<7i", head), 28
        shared = dims[5] > 0
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq = dims
    vocab = abs(vocab)
    if not (0 < dim <= 1 << 16 and 0 < hidden <= 1 << 18 and 0 < n_layers <= 1024 and
            0 < n_heads <= dim and 0 < n_kv <= n_heads and 0 < vocab <= 1 << 20 and
            0 < seq <= 1 << 20) or dim % n_heads or n_heads % n_kv or (dim // n_heads) % 2:
        raise ConversionError(f"{path}: implausible header {dims} (dim, hidden_dim, n_layers, "
                              "n_heads, n_kv_heads, vocab_size, seq_len)")
    cfg = LlamaConfig(vocab_size=vocab, dim=dim, n_layers=n_layers, n_heads=n_heads,
                      n_kv_heads=n_kv, hidden_dim=hidden, context_length=seq,
                      tie_embeddings=shared)
    shapes, order = _shapes(cfg), _order(cfg, version, shared)
    expected = offset + 4 * sum(int(np.prod(shapes[n])) for n in order)
    if size != expected:
        raise ConversionError(f"{path}: the header describes a {expected}-byte v{version} "
                              f"checkpoint, but the file has {size} bytes")
    data = np.memmap(path, dtype="<f4", mode="r", offset=offset)
    state, pos = {}, 0
    for name in order:
        n = int(np.prod(shapes[name]))
        state[name] = torch.from_numpy(np.array(data[pos:pos + n])).view(shapes[name])
        pos += n
    state.pop("freq_cis_real", None), state.pop("freq_cis_imag", None)
    if shared:
        state["output.weight"] = state["tok_embeddings.weight"]
    return cfg, state, version


def llama2c_to_artifact(checkpoint: PathLike, tokenizer_bin: PathLike, out_dir: PathLike,
                        dtype: str = "fp32") -> Path:
    """A llama2.c checkpoint (v0 or v1) and its tokenizer.bin -> a babyrt artifact."""
    cfg, state, _ = read_llama2c(checkpoint)
    model = Llama(cfg)
    model.load_state_dict(state)
    info = {"kind": "sentencepiece", "bos_id": 1, "eos_id": 2, "add_bos": True}
    return export_model(model, info, tokenizer_bin, out_dir, dtype=dtype,
                        model_config={"model": "llama2", **cfg.to_dict()})


def artifact_to_llama2c(artifact_dir: PathLike, out_file: PathLike, version: int = 1) -> Path:
    """A babyrt LLaMA artifact -> a llama2.c checkpoint (v0 or v1), fp32."""
    md = read_metadata(artifact_dir)
    if md["architecture"] != "llama":
        raise ConversionError(f"{artifact_dir}: llama2.c holds LLaMA models, not {md['architecture']}")
    if version not in (0, 1):
        raise ConversionError(f"llama2.c version must be 0 or 1, got {version}")
    module = torch.jit.load(str(Path(artifact_dir) / "model.pt"), map_location="cpu")
    state = {k: v.float() for k, v in module.state_dict().items()}
    emb, out = module.tok_embeddings.weight, module.output.weight
    shared = emb.data_ptr() == out.data_ptr()
    dim, hidden = emb.shape[1], state["layers.0.feed_forward.w1.weight"].shape[0]
    cfg = LlamaConfig(vocab_size=md["vocab_size"], dim=dim, n_layers=md["n_layers"],
                      n_heads=dim // md["head_dim"], n_kv_heads=md["n_kv_heads"],
                      hidden_dim=hidden, context_length=md["context_length"],
                      tie_embeddings=shared)
    hd = cfg.head_dim
    freqs = 1.0 / (10000.0 ** (torch.arange(0, hd, 2).float() / hd))
    angles = torch.outer(torch.arange(cfg.context_length).float(), freqs)
    state["freq_cis_real"], state["freq_cis_imag"] = angles.cos(), angles.sin()
    dims = [cfg.dim, cfg.hidden_dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.vocab_size,
            cfg.context_length]
    if version == 0:
        dims[5] = cfg.vocab_size if shared else -cfg.vocab_size
        header = struct.pack("<7i", *dims)
    else:
        header = struct.pack("<Ii7iB", MAGIC, 1, *dims, int(shared))
        header += b"\0" * (V1_HEADER - len(header))
    out_file = Path(out_file)
    tmp = out_file.with_name(out_file.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(header)
        for name in _order(cfg, version, shared):
            f.write(state[name].contiguous().numpy().astype("<f4").tobytes())
    tmp.replace(out_file)
    return out_file


def sentencepiece_to_tokenizer_bin(model_file: PathLike, out_file: PathLike) -> dict:
    """tokenizer.model -> llama2.c tokenizer.bin (scores kept, U+2581 as space, <0xHH> kept)."""
    from . import tokenizer_bin
    if not Path(model_file).is_file():
        raise ConversionError(f"{model_file}: no such sentencepiece model")
    try:
        return tokenizer_bin.write_from_sentencepiece(out_file, model_file)
    except (RuntimeError, OSError) as e:
        raise ConversionError(f"{model_file}: not a sentencepiece model ({str(e).splitlines()[0]})") from None
