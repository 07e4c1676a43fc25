"""Where the time of a one-kernel decode step (babyrt::decode_step) goes, phase by phase.

Run on the GPU machine: BABYRT_STEP_TRACE=1 python benchmarks/decode_step_trace.py --shape stories15M
The kernel records, per block, the time at its start, when its inputs are ready, after each
GEMV phase's staging of x and its rows, and before and after each grid barrier. Each mark is
taken at the slowest block; per phase this prints the differences: stage (x staged), rows (the
block's rows done), tail (pieces released, block synced), barrier (the wait for every block).
"""
import argparse
import os

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="stories15M")
    p.add_argument("--quantize", choices=["int8"], default=None)
    p.add_argument("--position", type=int, default=200, help="the step's position (context filled)")
    p.add_argument("--no-trace", action="store_true",
                   help="only run the steps (for a profiler such as ncu), print nothing")
    a = p.parse_args()
    assert a.no_trace or os.environ.get("BABYRT_STEP_TRACE"), "set BABYRT_STEP_TRACE=1"
    from babyrt.bench import shape_model
    from babyrt.fused_llama import FusedLlama
    from babyrt.quantize import QuantConfig

    with torch.device("cuda"):  # random init of a 1B model on the host takes a minute
        m = FusedLlama(shape_model(a.shape, 256), QuantConfig() if a.quantize else None)
    for prm in m.parameters():
        prm.data = prm.data.to(torch.bfloat16)
    m = m.cuda()
    kc = torch.zeros(m.n_layers, 1, m.n_kv_heads, m.context_length, m.head_dim, device="cuda",
                     dtype=torch.bfloat16)
    vc = torch.zeros_like(kc)
    weights, scales = m.step_tensors()
    tok = torch.tensor([[5]], device="cuda")
    pos = torch.tensor([[a.position]], device="cuda")
    for _ in range(20):
        out = torch.ops.babyrt.decode_step(tok, pos, weights, scales, m.rope_cos, m.rope_sin, kc, vc,
                                           m.n_heads, m.n_kv_heads, m.eps)
    torch.cuda.synchronize()
    assert out.numel() > 0, "decode_step did not cover this model"
    if a.no_trace:
        return
    t = torch.ops.babyrt.decode_step_trace().double()
    t = (t - t[:, 0].min()) / 1e3  # us from the first block's start
    last = t.max(0).values  # each mark at the slowest block
    print(f"{a.shape} {a.quantize or 'bf16'}: blocks start {t[:, 0].min():.2f}-{t[:, 0].max():.2f} us,"
          f" inputs ready by {last[1]:.2f} us")
    # The marks, in the kernel's order: per GEMV phase staged and rows done, then per barrier
    # arrived and passed (cpp/ops/cuda_decode_step.cu).
    phases = [("embedding", False)] + [(f"L{i} {n}", n != "attention") for i in range(m.n_layers)
                                       for n in ("qkv", "attention", "wo", "w13", "w2")]
    i, prev = 2, last[1]
    totals = {}
    for n, (name, gemv) in enumerate(phases):
        parts = {}
        if gemv:
            parts["stage"], parts["rows"] = last[i] - prev, last[i + 1] - last[i]
            prev, i = last[i + 1], i + 2
        parts["work" if not gemv else "tail"] = last[i] - prev
        parts["barrier"] = last[i + 1] - last[i]
        prev, i = last[i + 1], i + 2
        kind = name.split()[-1]
        for k, v in parts.items():
            totals[(kind, k)] = totals.get((kind, k), 0.0) + float(v)
        if n < 11:
            print(f"{name:>14}: " + "  ".join(f"{k} {v:5.2f}" for k, v in parts.items()))
    stage, rows, end = last[i] - prev, last[i + 1] - last[i], last[i + 2]
    print(f"{'classifier':>14}: stage {stage:5.2f}  rows {rows:5.2f}  end {end - last[i + 1]:5.2f};"
          f" kernel end {end:.2f} us")
    print("totals over the step (us):")
    for kind in ("embedding", "qkv", "attention", "wo", "w13", "w2"):
        print(f"{kind:>14}: " + "  ".join(f"{k} {v:6.1f}" for (kd, k), v in totals.items() if kd == kind))

if __name__ == "__main__":
    main()
