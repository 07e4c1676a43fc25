"""Conversions between babyrt and llama2.c (checkpoints v0, v1 and v2), Hugging Face transformers
(LlamaForCausalLM folders), and sentencepiece models (tokenizer.bin).

llama2.c layouts (fp32, little-endian), as karpathy's export.py writes them:
  v0 "legacy": int32 dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len
      (vocab_size < 0: the classifier is not shared with the embedding), then
      token_embedding, attention norms, wq, wk, wv, wo (all layers each), ffn norms, w1, w2, w3,
      final norm, freq_cis_real, freq_cis_imag [seq_len, head_dim / 2], and wcls if not shared.
  v1: a 256-byte header: uint32 magic "ak42", int32 version 1, the 7 ints above
      (vocab_size positive), uint8 shared_classifier, zero padding; then attention norms, ffn
      norms, final norm, token_embedding, wq, wk, wv, wo, w1, w2, w3, and wcls if not shared.
  v2 (Q8_0): the v1 header with version 2 and an int32 group_size after shared_classifier;
      fp32 attention norms, ffn norms and final norm; then for token_embedding, wq, wk, wv, wo,
      w1, w2, w3 (and wcls if not shared) in turn: all int8 values, then all fp32 scales, one
      per group of group_size consecutive values. This is babyrt's group-wise int8 when the
      group divides each matrix's row, and v2 files are read into int8 artifacts exactly.
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
from .quantize import QuantConfig, quantize_weight
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
    """(LlamaConfig, state_dict, {name: (int8, scales)} for v2 else {}, version) from a llama2.c
    checkpoint, validated against its size. v2 weights in state_dict are dequantized."""
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
        if version not in (1, 2):
            raise ConversionError(f"{path}: llama2.c format version {version} is not supported "
                                  "(babyrt reads v0, v1 and v2)")
        dims = struct.unpack_from("<7i", head, 8)
        shared = bool(head[36])
        group = struct.unpack_from("<i", head, 37)[0] if version == 2 else 0
        offset = V1_HEADER
    else:
        version, dims, offset, group = 0, struct.unpack_from("<7i", head), 28, 0
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
    shapes = _shapes(cfg)
    if version == 2:
        return cfg, *_read_q80(path, cfg, shapes, shared, group, size), version
    order = _order(cfg, version, shared)
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
    return cfg, state, {}, version


def _q80_order(cfg: LlamaConfig, shared: bool) -> tuple:
    """(fp32 norms, Q8_0 matrices) in v2 file order: v1's order, split after the norms."""
    order = _order(cfg, 1, shared)
    n_norms = 2 * cfg.n_layers + 1
    return order[:n_norms], order[n_norms:]


def _read_q80(path: Path, cfg: LlamaConfig, shapes: dict, shared: bool, group: int, size: int):
    """(dequantized state, {name: (int8 [N, K], scales [N, K / group])}) of a v2 file."""
    norms, mats = _q80_order(cfg, shared)
    if group <= 0 or any(shapes[n][1] % group for n in mats):
        raise ConversionError(f"{path}: group size {group} does not divide the rows of every "
                              "matrix, so it has no babyrt int8 equivalent")
    numel = [int(np.prod(shapes[n])) for n in mats]
    expected = V1_HEADER + 4 * sum(shapes[n][0] for n in norms) + sum(n + 4 * (n // group) for n in numel)
    if size != expected:
        raise ConversionError(f"{path}: the header describes a {expected}-byte v2 checkpoint, "
                              f"but the file has {size} bytes")
    raw = np.memmap(path, dtype=np.uint8, mode="r", offset=V1_HEADER)
    state, quantized, pos = {}, {}, 0
    for name in norms:
        n = shapes[name][0]
        state[name] = torch.from_numpy(np.frombuffer(raw[pos:pos + 4 * n].tobytes(), "<f4").copy())
        pos += 4 * n
    for name, n in zip(mats, numel):
        N, K = shapes[name]
        q = torch.from_numpy(np.frombuffer(raw[pos:pos + n].tobytes(), np.int8).copy()).view(N, K)
        pos += n
        s = torch.from_numpy(np.frombuffer(raw[pos:pos + 4 * (n // group)].tobytes(), "<f4").copy())
        pos += 4 * (n // group)
        quantized[name] = (q, s.view(N, K // group))
        state[name] = torch.ops.babyrt.dequantize(q, quantized[name][1])
    if shared:
        state["output.weight"] = state["tok_embeddings.weight"]
        quantized["output.weight"] = quantized["tok_embeddings.weight"]
    return state, quantized


def llama2c_to_artifact(checkpoint: PathLike, tokenizer_bin: PathLike, out_dir: PathLike,
                        dtype: str = "fp32") -> Path:
    """A llama2.c checkpoint (v0 or v1) and its tokenizer.bin -> a babyrt artifact."""
    cfg, state, quantized, version = read_llama2c(checkpoint)
    model = Llama(cfg)
    model.load_state_dict(state)
    info = {"kind": "sentencepiece", "bos_id": 1, "eos_id": 2, "add_bos": True}
    quant = None
    if version == 2:  # an int8 artifact holding the file's own int8 values and scales
        q, s = quantized["tok_embeddings.weight"]
        quant = QuantConfig(group_size=q.shape[1] // s.shape[1], embedding=True)
    return export_model(model, info, tokenizer_bin, out_dir, dtype=dtype, quant=quant,
                        model_config={"model": "llama2", **cfg.to_dict()},
                        exact_int8=_fused_names(quantized, cfg.n_layers) if quantized else None)


def _fused_names(quantized: dict, n_layers: int) -> dict:
    """{FusedLlama weight name: (int8, scales)} from training-layout names, stacked as
    FUSED_WEIGHTS says."""
    from .fused_llama import FUSED_WEIGHTS

    out = {"output": quantized["output.weight"], "tok_embeddings": quantized["tok_embeddings.weight"]}
    for i in range(n_layers):
        p = f"layers.{i}."
        for fused, parts in FUSED_WEIGHTS.items():
            qs = [quantized[f"{p}{n}.weight"] for n in parts]
            out[p + fused] = (torch.cat([q for q, _ in qs]), torch.cat([s for _, s in qs]))
    return out


def _artifact_state(artifact_dir: PathLike) -> tuple:
    """(training-layout fp32 state dict, classifier shared) of a LLaMA artifact."""
    from .fused_llama import training_state_dict

    module = torch.jit.load(str(Path(artifact_dir) / "model.pt"), map_location="cpu")
    return training_state_dict(module)


def artifact_to_llama2c(artifact_dir: PathLike, out_file: PathLike, version: int = 1,
                        group_size: int = 64) -> Path:
    """A babyrt LLaMA artifact -> a llama2.c checkpoint: v0 or v1 (fp32), or v2 (Q8_0 with
    group_size, halved as llama2.c's export does until it divides every matrix's rows)."""
    md = read_metadata(artifact_dir)
    if md["architecture"] != "llama":
        raise ConversionError(f"{artifact_dir}: llama2.c holds LLaMA models, not {md['architecture']}")
    if version not in (0, 1, 2):
        raise ConversionError(f"llama2.c version must be 0, 1 or 2, got {version}")
    if version == 2 and (isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1):
        raise ConversionError(f"group_size must be a positive int, got {group_size!r}")
    state, shared = _artifact_state(artifact_dir)
    dim, hidden = state["norm.weight"].shape[0], state["layers.0.feed_forward.w1.weight"].shape[0]
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
    elif version == 1:
        header = struct.pack("<Ii7iB", MAGIC, 1, *dims, int(shared))
    else:
        while group_size > 1 and (cfg.dim % group_size or cfg.hidden_dim % group_size):
            group_size //= 2
        header = struct.pack("<Ii7iBi", MAGIC, 2, *dims, int(shared), group_size)
    header += b"\0" * ((V1_HEADER - len(header)) if version else 0)
    out_file = Path(out_file)
    tmp = out_file.with_name(out_file.name + ".tmp")
    try:
        _write_llama2c(tmp, header, state, cfg, version, shared, group_size)
    except BaseException:
        tmp.unlink(missing_ok=True)  # nothing half-written stays behind
        raise
    tmp.replace(out_file)
    return out_file


def _write_llama2c(path: Path, header: bytes, state: dict, cfg: LlamaConfig, version: int,
                   shared: bool, group_size: int) -> None:
    with open(path, "wb") as f:
        f.write(header)
        if version == 2:
            norms, mats = _q80_order(cfg, shared)
            for name in norms:
                f.write(state[name].numpy().astype("<f4").tobytes())
            for name in mats:
                q, s = quantize_weight(state[name], group_size)
                f.write(q.numpy().tobytes())
                f.write(s.numpy().astype("<f4").tobytes())
        else:
            for name in _order(cfg, version, shared):
                f.write(state[name].contiguous().numpy().astype("<f4").tobytes())


def sentencepiece_to_tokenizer_bin(model_file: PathLike, out_file: PathLike) -> dict:
    """tokenizer.model -> llama2.c tokenizer.bin (scores kept, U+2581 as space, <0xHH> kept)."""
    from . import tokenizer_bin
    if not Path(model_file).is_file():
        raise ConversionError(f"{model_file}: no such sentencepiece model")
    try:
        return tokenizer_bin.write_from_sentencepiece(out_file, model_file)
    except (RuntimeError, OSError) as e:
        raise ConversionError(f"{model_file}: not a sentencepiece model ({str(e).splitlines()[0]})") from None


# --- Hugging Face transformers LlamaForCausalLM ---------------------------------------------
# transformers rotates q/k by halves; Meta, llama2.c and babyrt rotate interleaved pairs. The
# permutation below (transformers' own convert_llama_weights_to_hf, inverted) moves between them.

def _hf_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    out, d = w.shape
    return w.view(n_heads, 2, out // n_heads // 2, d).transpose(1, 2).reshape(out, d)


def _interleaved_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    out, d = w.shape
    return w.view(n_heads, out // n_heads // 2, 2, d).transpose(1, 2).reshape(out, d)


def _hf_names(i: int) -> dict:
    p, q = f"model.layers.{i}.", f"layers.{i}."
    return {p + "input_layernorm.weight": q + "attention_norm.weight",
            p + "post_attention_layernorm.weight": q + "ffn_norm.weight",
            p + "self_attn.q_proj.weight": q + "attention.wq.weight",
            p + "self_attn.k_proj.weight": q + "attention.wk.weight",
            p + "self_attn.v_proj.weight": q + "attention.wv.weight",
            p + "self_attn.o_proj.weight": q + "attention.wo.weight",
            p + "mlp.gate_proj.weight": q + "feed_forward.w1.weight",
            p + "mlp.down_proj.weight": q + "feed_forward.w2.weight",
            p + "mlp.up_proj.weight": q + "feed_forward.w3.weight"}


def _read_hf_state(folder: Path) -> dict:
    files = sorted(folder.glob("*.safetensors"))
    if files:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        state = {}
        for f in files:
            try:
                state.update(load_file(str(f)))
            except (SafetensorError, OSError) as e:
                raise ConversionError(f"{f}: not a readable safetensors file ({e})") from None
        return state
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if not bins:
        raise ConversionError(f"{folder}: no model.safetensors or pytorch_model.bin")
    state = {}
    for f in bins:
        try:
            state.update(torch.load(f, map_location="cpu", weights_only=True))
        except Exception as e:  # weights_only refuses code; anything unreadable ends here
            raise ConversionError(f"{f}: not a readable weights file ({str(e).splitlines()[0]})") from None
    return state


def hf_to_artifact(folder: PathLike, out_dir: PathLike, tokenizer_bin: PathLike | None = None,
                   dtype: str = "fp32") -> Path:
    """A transformers LlamaForCausalLM folder (config.json + safetensors or pytorch_model.bin,
    with tokenizer.model if present) -> a babyrt artifact."""
    import json
    import tempfile

    folder = Path(folder)
    try:
        c = json.loads((folder / "config.json").read_text())
    except FileNotFoundError:
        raise ConversionError(f"{folder}: no config.json") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{folder}/config.json: not valid JSON ({e})") from None
    if not isinstance(c, dict) or c.get("model_type") != "llama":
        raise ConversionError(f"{folder}/config.json: model_type must be 'llama'")
    try:
        n_heads = int(c["num_attention_heads"])
        cfg = LlamaConfig(vocab_size=int(c["vocab_size"]), dim=int(c["hidden_size"]),
                          n_layers=int(c["num_hidden_layers"]), n_heads=n_heads,
                          n_kv_heads=int(c.get("num_key_value_heads") or n_heads),
                          hidden_dim=int(c["intermediate_size"]),
                          norm_eps=float(c.get("rms_norm_eps", 1e-6)),
                          context_length=int(c.get("max_position_embeddings", 2048)),
                          rope_theta=float(c.get("rope_theta") or
                                           (c.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
                          tie_embeddings=bool(c.get("tie_word_embeddings", False)))
    except (KeyError, TypeError, ValueError) as e:
        raise ConversionError(f"{folder}/config.json: bad or missing field ({e})") from None
    if c.get("hidden_act", "silu") != "silu" or c.get("attention_bias") or c.get("mlp_bias") \
            or c.get("rope_scaling"):
        raise ConversionError(f"{folder}/config.json: only plain Llama (silu, no biases, no rope "
                              "scaling) converts")
    hf = _read_hf_state(folder)
    names = {"model.embed_tokens.weight": "tok_embeddings.weight",
             "model.norm.weight": "norm.weight", "lm_head.weight": "output.weight"}
    for i in range(cfg.n_layers):
        names.update(_hf_names(i))
    state = {}
    for src, dst in names.items():
        if src not in hf:
            if src == "lm_head.weight" and cfg.tie_embeddings:
                continue
            raise ConversionError(f"{folder}: weights lack {src}")
        w = hf[src].float()
        if src.endswith("q_proj.weight"):
            w = _hf_to_interleaved(w, cfg.n_heads)
        elif src.endswith("k_proj.weight"):
            w = _hf_to_interleaved(w, cfg.n_kv_heads)
        state[dst] = w
    if cfg.tie_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    model = Llama(cfg)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ConversionError(f"{folder}: weights do not match config.json: "
                              f"{str(e).splitlines()[0]}") from None
    with tempfile.TemporaryDirectory() as tmp:
        if tokenizer_bin is None:
            if not (folder / "tokenizer.model").is_file():
                raise ConversionError(f"{folder}: no tokenizer.model; pass a tokenizer.bin")
            tokenizer_bin = Path(tmp) / "tokenizer.bin"
            sentencepiece_to_tokenizer_bin(folder / "tokenizer.model", tokenizer_bin)
        bos, eos = c.get("bos_token_id"), c.get("eos_token_id")
        info = {"kind": "sentencepiece", "bos_id": bos if isinstance(bos, int) else -1,
                "eos_id": eos if isinstance(eos, int) else -1, "add_bos": isinstance(bos, int)}
        return export_model(model, info, tokenizer_bin, out_dir, dtype=dtype,
                            model_config={"model": "llama2", **cfg.to_dict()})


def artifact_to_hf(artifact_dir: PathLike, out_dir: PathLike) -> Path:
    """A babyrt LLaMA artifact -> a folder that transformers' LlamaForCausalLM loads
    (config.json + model.safetensors, fp32)."""
    import json

    from safetensors.torch import save_file

    md = read_metadata(artifact_dir)
    if md["architecture"] != "llama":
        raise ConversionError(f"{artifact_dir}: only LLaMA artifacts convert to transformers")
    state, shared = _artifact_state(artifact_dir)
    dim = state["norm.weight"].shape[0]
    n_heads, n_kv = dim // md["head_dim"], md["n_kv_heads"]
    cfg_extra = md.get("model_config", {})
    back = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
            "output.weight": "lm_head.weight"}
    for i in range(md["n_layers"]):
        back.update({v: k for k, v in _hf_names(i).items()})
    hf = {}
    for name, w in state.items():
        if name not in back or (shared and name == "output.weight"):
            continue
        if name.endswith("wq.weight"):
            w = _interleaved_to_hf(w, n_heads)
        elif name.endswith("wk.weight"):
            w = _interleaved_to_hf(w, n_kv)
        hf[back[name]] = w.contiguous()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(hf, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
              "vocab_size": md["vocab_size"], "hidden_size": dim,
              "intermediate_size": state["layers.0.feed_forward.w1.weight"].shape[0],
              "num_hidden_layers": md["n_layers"], "num_attention_heads": n_heads,
              "num_key_value_heads": n_kv, "head_dim": md["head_dim"], "hidden_act": "silu",
              "max_position_embeddings": md["context_length"],
              "rms_norm_eps": cfg_extra.get("norm_eps", 1e-5),
              "rope_theta": cfg_extra.get("rope_theta", 10000.0), "tie_word_embeddings": shared,
              "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32",
              "bos_token_id": md["bos_id"] if md["bos_id"] >= 0 else None,
              "eos_token_id": md["eos_id"] if md["eos_id"] >= 0 else None}
    (out / "config.json").write_text(json.dumps(config, indent=1))
    return out
