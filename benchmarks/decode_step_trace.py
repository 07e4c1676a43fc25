"""Where the time of a one-kernel decode step (babyrt::decode_step) goes, phase by phase.

Run on the GPU machine: BABYRT_STEP_TRACE=1 python benchmarks/decode_step_trace.py --shape stories15M
The kernel records, per block, the time at its start, when its inputs are ready, and before and
after each grid barrier. Per phase this prints the work (the slowest block's arrival at the
barrier, from the previous barrier's release) and the wait (release minus that arrival).
"""
import argparse
import os

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="stories15M")
    p.add_argument("--quantize", choices=["int8"], default=None)
    p.add_argument("--position", type=int, default=200, help="the step's position (context filled)")
    a = p.parse_args()
    assert os.environ.get("BABYRT_STEP_TRACE"), "set BABYRT_STEP_TRACE=1"
    from babyrt.bench import shape_model
    from babyrt.fused_llama import FusedLlama
    from babyrt.quantize import QuantConfig

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
    t = torch.ops.babyrt.decode_step_trace().double()
    t0 = t[:, 0].min()
    t = (t - t0) / 1e3  # us from the first block's start
    n_barriers = 1 + 5 * m.n_layers
    names = ["embedding"] + [f"L{i} {n}" for i in range(m.n_layers)
                             for n in ("qkv", "attention", "wo", "w13", "w2")]
    print(f"{a.shape} {a.quantize or 'bf16'}: blocks start {t[:, 0].min():.2f}-{t[:, 0].max():.2f} us, "
          f"inputs ready by {t[:, 1].max():.2f} us")
    prev = t[:, 1].max()
    work_total = wait_total = 0.0
    for b in range(n_barriers):
        i = 2 + 2 * b
        if i + 1 >= t.shape[1]:
            break
        arrived, passed = t[:, i].max(), t[:, i + 1].max()
        work, wait = arrived - prev, passed - arrived
        work_total += work
        wait_total += wait
        if b < 12 or b == n_barriers - 1:
            print(f"{names[b]:>14}: work {work:6.2f} us  barrier {wait:5.2f} us")
        prev = passed
    end = 2 + 2 * n_barriers
    if end < t.shape[1]:
        print(f"{'classifier':>14}: {t[:, end].max() - prev:6.2f} us; kernel end {t[:, end].max():.2f} us")
    print(f"total work {work_total:.1f} us, barriers {wait_total:.1f} us over {n_barriers}")


if __name__ == "__main__":
    main()
