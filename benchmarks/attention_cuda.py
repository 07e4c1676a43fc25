"""Time of babyrt's CUDA decode attention at batch 1 for the shapes of `babyrt bench`: alone,
what it adds after the QKV GEMV that feeds it (as in a decode step, under PDL), and the QKV
GEMV, attention and wo projection as separate ops against the attention_linear op (one kernel
for attention and wo with BABYRT_ATTN_LINEAR=1; by default it runs the same two kernels).

    python benchmarks/attention_cuda.py [--shapes stories15M,stories110M,1b-gqa]
                                        [--positions 16,144,272] [--json OUT]

Each timing is a CUDA graph of 200 back-to-back calls (babyrt.bench.cuda_graph_seconds); the
QKV weights (bf16) cycle through enough copies to be read from HBM. The kernels' opt-in switches
(BABYRT_PDL=0, BABYRT_ATTN_LINEAR=1) come from the environment: compare runs with and without.
"""
import argparse
import json

import torch

import babyrt  # noqa: F401  (registers torch.ops.babyrt)
from babyrt.bench import SHAPES, cuda_graph_seconds
from babyrt.training.models.layers import rope_tables

ops = torch.ops.babyrt
CACHE_SLOTS = 512  # babyrt bench's cache: max(512, prompt + new tokens)


def measure(shape: str, positions: list) -> list:
    cfg = SHAPES[shape]
    dim, H = cfg["dim"], cfg["n_heads"]
    KV, D = cfg.get("n_kv_heads", H), dim // H
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    torch.manual_seed(0)
    cos, sin = (t.cuda() for t in rope_tables(D, CACHE_SLOTS, 10000.0))
    kc = torch.randn(1, KV, CACHE_SLOTS, D, **bf16)
    vc = torch.randn_like(kc)
    x, norm = torch.randn(1, 1, dim, **bf16), torch.ones(dim, **bf16)
    rows = (H + 2 * KV) * D
    copies = max(4, 4 * torch.cuda.get_device_properties(0).L2_cache_size // (2 * rows * dim) + 1)
    ws = [torch.randn(rows, dim, **bf16) * dim ** -0.5 for _ in range(copies)]
    wos = [torch.randn(dim, H * D, **bf16) * dim ** -0.5 for _ in range(copies)]
    qkv = ops.rmsnorm_linear(x, norm, 1e-5, ws[0], None)
    out = []
    for p in positions:
        pos = torch.tensor([[p]], device="cuda")
        gemv = lambda i: ops.rmsnorm_linear(x, norm, 1e-5, ws[i], None)  # noqa: E731
        attn = lambda i: ops.attention(qkv, pos, cos, sin, kc, vc, H, KV)  # noqa: E731
        both = lambda i: ops.attention(gemv(i), pos, cos, sin, kc, vc, H, KV)  # noqa: E731
        two = lambda i: ops.linear(ops.attention(gemv(i), pos, cos, sin, kc, vc, H, KV),  # noqa: E731
                                   wos[i], None, x)
        one = lambda i: ops.attention_linear(gemv(i), pos, cos, sin, kc, vc, H, KV,  # noqa: E731
                                             wos[i], None, x)
        t_gemv, t_attn, t_both, t_two, t_one = (1e6 * cuda_graph_seconds(f, copies)
                                                for f in (gemv, attn, both, two, one))
        row = {"shape": shape, "H": H, "KV": KV, "D": D, "position": p, "attention_us": t_attn,
               "qkv_gemv_us": t_gemv, "gemv_then_attention_us": t_both,
               "attention_adds_us": t_both - t_gemv, "qkv_attention_wo_us": t_two,
               "qkv_attention_linear_us": t_one}
        print(f"{shape} (H {H}, KV {KV}, D {D}) position {p}: attention {t_attn:.2f} us alone, "
              f"QKV GEMV {t_gemv:.2f} us, both {t_both:.2f} us (attention adds {t_both - t_gemv:.2f}); "
              f"QKV, attention, wo {t_two:.2f} us, through attention_linear {t_one:.2f} us")
        out.append(row)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="stories15M,stories110M,1b-gqa")
    ap.add_argument("--positions", default="16,144,272")
    ap.add_argument("--json")
    a = ap.parse_args()
    shapes = a.shapes.split(",")
    unknown = set(shapes) - set(SHAPES)
    if unknown:
        ap.error(f"unknown shapes {sorted(unknown)}; choose from {sorted(SHAPES)}")
    positions = [int(p) for p in a.positions.split(",")]
    if not all(0 <= p < CACHE_SLOTS for p in positions):
        ap.error(f"positions must lie in 0..{CACHE_SLOTS - 1}")
    rows = [r for s in shapes for r in measure(s, positions)]
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
