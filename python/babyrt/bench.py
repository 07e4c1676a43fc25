"""babyrt bench: prompt processing (pp) and token generation (tg) speed of the C++ runtime, in
the spirit of llama-bench, next to its peers measured in the same run on the same weights.

An artifact is benchmarked as it is; a --shape builds a LLaMA of that shape with random weights
(seed 0) and a synthetic char vocabulary, exported once per variant (fp32/bf16/fp16, int8).
Every figure is the median of --repeat timed runs after a warm-up run.
"""
from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

SHAPES = {
    "stories15M": dict(dim=288, n_layers=6, n_heads=6, hidden_dim=768),
    "stories110M": dict(dim=768, n_layers=12, n_heads=12, hidden_dim=2048),
    "1b-gqa": dict(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, hidden_dim=5632),
}
PROMPT = "Once upon a time"  # 16 characters: 16 tokens with the synthetic char vocabulary


def shape_model(shape: str, context_length: int):
    from .training.models.llama import Llama, LlamaConfig

    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {sorted(SHAPES)}, got {shape!r}")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32000, context_length=context_length, tie_embeddings=True,
                      **SHAPES[shape])
    return Llama(cfg).eval()


def _source_hash() -> str:
    """A hash of babyrt's Python files and artifact format, which make an exported module."""
    import hashlib

    h = hashlib.sha256()
    root = Path(__file__).parent
    for f in sorted([*root.rglob("*.py"), root / "artifact_format.json"]):
        h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:12]


def shape_artifacts(shape: str, context: int, dtype: str, quants: list, out_dir, model=None) -> list:
    """(name, path) of --shape's artifacts, one per quantization in quants (None: dtype
    weights), in out_dir: exported from the random-weight model (seed 0; model, if the caller
    has built it already), or found there from an earlier call. A directory's name carries the
    shape, context, variant and a hash of babyrt's Python source, so that a cache dir never
    serves a module that other code exported (each is exported beside it, then renamed into
    place: written whole or not at all, and the first of two runs that export it at once is the
    one kept)."""
    from .export import export_model

    out_dir, found, source = Path(out_dir), [], _source_hash()
    out_dir.mkdir(parents=True, exist_ok=True)
    for q in quants:
        name = f"{shape} {dtype}" + (" int8" if q else "")
        group = f"-g{q.group_size}" if q and q.group_size else ""
        path = out_dir / f"{name.replace(' ', '-')}{group}-ctx{context}-{source}"
        if not path.exists():
            if model is None:
                model = shape_model(shape, context)
            with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=out_dir) as tmp:
                vocab = Path(tmp) / "tokenizer.bin"
                _synthetic_vocab(vocab, model.cfg.vocab_size)
                info = {"kind": "char", "bos_id": -1, "eos_id": -1, "add_bos": False}
                mine = export_model(model, info, vocab, Path(tmp) / "artifact", dtype=dtype, quant=q)
                try:  # another run may have put the same artifact there meanwhile: keep that one
                    mine.rename(path)
                except OSError:
                    if not path.exists():
                        raise
        found.append((name, path))
    return found


def _synthetic_vocab(path: Path, vocab_size: int) -> None:
    """One character per token: printable ASCII first (so PROMPT encodes one token per
    character), then code points from U+0100 up."""
    from .tokenizer_bin import write_char_vocab

    chars = [chr(c) for c in range(32, 127)]
    chars += [chr(c) for c in range(0x100, 0x100 + vocab_size - len(chars))]
    write_char_vocab(path, chars)


def copy_bandwidth(device: str) -> float:
    """Bytes moved per second (read + write) by a 256 MB device-to-device copy, best of 5.
    On CUDA the copy is timed with CUDA events: a host timer adds the launch and the
    synchronisation to a ~0.13 ms copy (H200: 3.74 TB/s host-timed, 3.93-4.07 with events)."""
    src = torch.ones(64 << 20, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up
    best = float("inf")
    for _ in range(5):
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3)
        else:
            t = _now(device)
            dst.copy_(src)
            best = min(best, _now(device) - t)
    return 2 * src.nbytes / best


def cuda_graph_seconds(fn, n_inputs: int, iters: int = 200) -> float:
    """Seconds per call of fn(i % n_inputs) (CUDA ops), timed with CUDA events over a CUDA
    graph of `iters` back-to-back calls, best of 5, so that host launch overhead is out of the
    picture. Cycling through n_inputs inputs lets a caller keep them out of L2."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(n_inputs):  # warm-up
            fn(i)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(iters):
            fn(i % n_inputs)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(5):
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3 / iters)
    return best


def _now(device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter()


def weight_bytes(artifact_dir) -> int:
    """Bytes of weights a decode step reads: every tensor of the module once (tied tables
    count once), less an untied token table (one row is read) and the RoPE tables."""
    module = torch.jit.load(str(Path(artifact_dir) / "model.pt"), map_location="cpu")
    seen, total = set(), 0
    sd = module.state_dict()
    emb = sd.get("tok_embeddings.weight")
    out = sd.get("output.weight")
    skip_emb = emb is not None and out is not None and emb.data_ptr() != out.data_ptr()
    for name, t in sd.items():
        if t.data_ptr() in seen or "rope" in name or (skip_emb and name.startswith("tok_embeddings")):
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def run_babyrt(artifact_dir, device: str, dtype: Optional[str], new_tokens: int, repeat: int) -> dict:
    import babyrt

    model = babyrt.load(artifact_dir, device=device, dtype=dtype)
    runs = []
    for i in range(repeat + 1):
        model.generate(PROMPT, max_new_tokens=new_tokens, temperature=0.0)
        if i:  # the first run warms up
            runs.append(model.last_stats)
    s = runs[-1]
    pp = statistics.median(r["prompt_tokens"] / r["prefill_seconds"] for r in runs)
    tg = statistics.median(r["decode_steps"] / r["decode_seconds"] for r in runs)
    return {"pp_tok_s": pp, "tg_tok_s": tg, "prompt_tokens": s["prompt_tokens"],
            "new_tokens": s["generated_tokens"]}


def run_cli(artifact_dir, device: str, dtype: Optional[str], new_tokens: int,
            repeat: int) -> Optional[dict]:
    """babyrt-run, the C++ binary, on the same artifact and settings (its --repeat reports the
    medians of `repeat` runs after a warm-up, as run_babyrt does). None when it is not installed."""
    import re
    import shutil
    import subprocess
    import sys

    exe = Path(sys.executable).parent / "babyrt-run"
    exe = str(exe) if exe.exists() else shutil.which("babyrt-run")
    if exe is None:
        return None
    cmd = [exe, str(artifact_dir), "-p", PROMPT, "-n", str(new_tokens), "-t", "0",
           "--device", device, "--repeat", str(repeat)] + (["--dtype", dtype] if dtype else [])
    r = subprocess.run(cmd, capture_output=True, text=True)
    m = re.search(r"prompt \d+ tokens, ([\d.]+) tok/s \| generated \d+ tokens, ([\d.]+) tok/s",
                  r.stderr)
    if r.returncode != 0 or m is None:
        raise RuntimeError(f"babyrt-run failed: {r.stderr.strip()[-500:]}")
    return {"pp_tok_s": float(m[1]), "tg_tok_s": float(m[2])}


def _static_cache(m, device: str, dtype: torch.dtype) -> tuple:
    c = m.cfg
    k = torch.zeros((c.n_layers, 1, c.n_kv_heads, c.context_length, c.head_dim), device=device,
                    dtype=dtype)
    return k, torch.zeros_like(k)


def _prefill(m, prompt_ids: list, kc, vc, device: str) -> torch.Tensor:
    """Greedy first token after the prompt, filling the cache."""
    x = torch.tensor([prompt_ids], device=device)
    return m(x, torch.arange(len(prompt_ids), device=device)[None], kc, vc)[:, -1].argmax(-1, keepdim=True)


def run_eager(model, device: str, dtype: torch.dtype, new_tokens: int, repeat: int,
              prompt_ids: list) -> dict:
    """The peer: the training model in a Python loop with a static KV cache, greedy."""
    m = model.to(device=device, dtype=dtype)
    tg = []
    with torch.inference_mode():
        for i in range(repeat + 1):
            kc, vc = _static_cache(m, device, dtype)
            tok = _prefill(m, prompt_ids, kc, vc, device)
            t = _now(device)
            for p in range(len(prompt_ids), len(prompt_ids) + new_tokens - 1):
                logits = m(tok, torch.tensor([[p]], device=device), kc, vc)
                tok = logits[:, -1].argmax(-1, keepdim=True)
            tok.item()
            if i:
                tg.append((new_tokens - 1) / (_now(device) - t))
    return {"tg_tok_s": statistics.median(tg)}


class _CompiledStep(torch.nn.Module):
    """One greedy decode step with the KV cache held as buffers, as gpt-fast does: static
    addresses that the CUDA graphs of mode="reduce-overhead" may update in place."""

    def __init__(self, m, kc, vc):
        super().__init__()
        self.m = m
        self.register_buffer("kc", kc)
        self.register_buffer("vc", vc)

    def forward(self, tok, pos):
        return self.m(tok, pos, self.kc, self.vc)[:, -1].argmax(-1, keepdim=True)


def run_compiled(model, device: str, dtype: torch.dtype, new_tokens: int, repeat: int,
                 prompt_ids: list) -> dict:
    """The gpt-fast-style peer: one decode step of the training model with a static KV cache,
    under torch.compile (mode reduce-overhead, i.e. CUDA graphs, on a GPU)."""
    m = model.to(device=device, dtype=dtype)
    module = _CompiledStep(m, *_static_cache(m, device, dtype))
    step = torch.compile(module, mode="reduce-overhead" if device.startswith("cuda") else "default",
                         fullgraph=True)
    tg = []
    with torch.inference_mode():
        for i in range(repeat + 2):  # two warm-ups: compile, then capture
            module.kc.zero_()
            module.vc.zero_()
            tok = _prefill(m, prompt_ids, module.kc, module.vc, device)
            pos = torch.tensor([[len(prompt_ids)]], device=device)
            t = _now(device)
            for _ in range(new_tokens - 1):
                tok = step(tok, pos).clone()
                pos += 1
            tok.item()
            if i >= 2:
                tg.append((new_tokens - 1) / (_now(device) - t))
    return {"tg_tok_s": statistics.median(tg)}


def run_hf(artifact_dir, device: str, dtype: torch.dtype, new_tokens: int, repeat: int,
           prompt_ids: list, tmp: Path) -> Optional[dict]:
    """transformers' generate (greedy) on the same weights, converted with babyrt convert --to hf.
    None when transformers is not installed."""
    try:
        from transformers import LlamaForCausalLM
    except ImportError:
        return None
    from .convert import artifact_to_hf

    folder = artifact_to_hf(artifact_dir, tmp / "hf")
    hf = LlamaForCausalLM.from_pretrained(folder, torch_dtype=dtype).to(device).eval()
    x = torch.tensor([prompt_ids], device=device)
    runs = []
    with torch.inference_mode():
        for i in range(repeat + 1):
            t = _now(device)
            hf.generate(x, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            if i:
                runs.append(new_tokens / (_now(device) - t))
    return {"tg_tok_s": statistics.median(runs)}  # prefill included, as generate() runs it


def bench(artifact: Optional[str] = None, shape: Optional[str] = None, device: str = "cpu",
          dtype: Optional[str] = None, quantize: bool = False, group_size: Optional[int] = None,
          new_tokens: int = 256, repeat: int = 3, peers=("eager",),
          cache_dir: Optional[str] = None) -> dict:
    """peers: any of "cli" (babyrt-run, the C++ binary, on every variant), and "eager",
    "compile", "hf" (on --shape models only). cache_dir: where --shape's artifacts are kept
    and found again (see shape_artifacts; by default a temporary directory)."""
    from .artifact import read_metadata
    from .export import DTYPES
    from .quantize import QuantConfig

    bw = copy_bandwidth(device)
    fdtype = dtype or ("fp32" if device == "cpu" else "bf16")  # float dtype of --shape models
    rows, model = [], None
    with tempfile.TemporaryDirectory(prefix="babyrt-bench-") as tmp:
        if artifact:
            variants = [(Path(artifact).name, Path(artifact), dtype)]
        else:
            context = max(512, len(PROMPT) + new_tokens)
            quants = [None, QuantConfig(group_size=group_size)] if quantize else [None]
            # The peers run the same weights; built once here, it also serves any export.
            model = shape_model(shape, context) if [p for p in peers if p != "cli"] else None
            variants = [(name, path, None) for name, path in
                        shape_artifacts(shape, context, fdtype, quants, cache_dir or tmp, model)]
        for name, path, dt in variants:
            r = run_babyrt(path, device, dt, new_tokens, repeat)
            wb = weight_bytes(path)
            md = read_metadata(path)

            def row(runtime: str, r: dict) -> dict:  # a run of this artifact, and its GB/s
                return {"runtime": runtime, "model": name, "device": device,
                        "dtype": dt or md["dtype"], "quantization": md["quantization"],
                        "weight_bytes": wb, **r, "ms_per_token": 1e3 / r["tg_tok_s"],
                        "weight_gb_s": wb * r["tg_tok_s"] / 1e9,
                        "pct_copy_bw": 100 * wb * r["tg_tok_s"] / bw}

            rows.append(row("babyrt", r))
            if "cli" in peers:
                r = run_cli(path, device, dt, new_tokens, repeat)
                if r is not None:
                    rows.append(row("babyrt-run (C++ CLI)", r))
        peers = [p for p in peers if p != "cli"]
        if peers and model is not None:
            tdtype = DTYPES[fdtype]
            prompt_ids = [ord(ch) - 32 for ch in PROMPT]
            runners = {
                "eager": ("PyTorch eager loop", lambda: run_eager(model, device, tdtype, new_tokens,
                                                                  repeat, prompt_ids)),
                "compile": ("torch.compile loop", lambda: run_compiled(
                    model, device, tdtype, new_tokens, repeat, prompt_ids)),
                "hf": ("HF transformers generate", lambda: run_hf(
                    variants[0][1], device, tdtype, new_tokens, repeat, prompt_ids, Path(tmp)))}
            for peer in peers:
                label, run = runners[peer]
                r = run()
                if r is not None:
                    rows.append({"runtime": label, "model": f"{shape}", "device": device,
                                 "dtype": fdtype, "quantization": "none",
                                 **r, "ms_per_token": 1e3 / r["tg_tok_s"]})
    return {"device": device, "copy_gb_s": bw / 1e9, "new_tokens": new_tokens,
            "prompt": PROMPT, "threads": torch.get_num_threads(), "rows": rows}


def table(result: dict) -> str:
    lines = [f"device {result['device']}, copy bandwidth {result['copy_gb_s']:.1f} GB/s, "
             f"{result['threads']} threads, {result['new_tokens']} new tokens",
             "| runtime | model | quant | pp tok/s | tg tok/s | ms/token | weight GB/s | % copy BW |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        pp = f"{r['pp_tok_s']:,.0f}" if "pp_tok_s" in r else "-"
        gbs = f"{r['weight_gb_s']:.1f}" if "weight_gb_s" in r else "-"
        pct = f"{r['pct_copy_bw']:.0f}%" if "pct_copy_bw" in r else "-"
        lines.append(f"| {r['runtime']} | {r['model']} | {r['quantization']} | {pp} | "
                     f"{r['tg_tok_s']:,.1f} | {r['ms_per_token']:.3f} | {gbs} | {pct} |")
    return "\n".join(lines)


def plot(result: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['runtime']}\n{r['model']}" for r in result["rows"]]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(labels)), 4))
    ax.bar(labels, [r["tg_tok_s"] for r in result["rows"]])
    ax.set_ylabel("tokens / s (tg)")
    ax.set_title(f"batch 1 decode, {result['device']}")
    fig.tight_layout()
    fig.savefig(path)


def main(a) -> None:
    if not a.artifact and not a.shape:
        raise ValueError("give an ARTIFACT_DIR or --shape")
    peers = [] if a.no_peers else [p for p in a.peers.split(",") if p]
    unknown = set(peers) - {"cli", "eager", "compile", "hf"}
    if unknown:
        raise ValueError(f"unknown peers {sorted(unknown)}: choose from cli, eager, compile, hf")
    result = bench(a.artifact, a.shape, a.device, a.dtype, a.quantize == "int8", a.group_size,
                   a.new_tokens, a.repeat, peers, a.cache_dir)
    print(table(result))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))
    if a.plot:
        plot(result, a.plot)
