"""Where a CUDA decode step spends its time: the kernels of one greedy generation (256 tokens)
under torch.profiler, grouped by kernel, per decode step, next to the wall time per step.

    python benchmarks/cuda_decode_profile.py --shape stories15M [--quantize int8] [--json OUT]

The runtime replays CUDA graphs; CUPTI still reports each kernel in them. 'GPU busy' is the sum
of kernel durations; the rest of the wall time per step is launch latency and gaps between
kernels. Under programmatic dependent launch (the default) a kernel starts before its
predecessor ends and its duration includes the wait, so durations overlap and their sum exceeds
the wall time; run with BABYRT_PDL=0 for durations alone. The second table holds under PDL too:
a kernel's marginal time is what it adds to the step, its end less the later of the previous
kernel's end (in start order) and its own start; its head start is how long before the previous
kernel's end it started, and its gap how long after (idle time, e.g. between graph replays).
The third table splits the marginal times by role: a kernel by its short name (a GEMV with its
fused activation, "pair" for ffn_block's w13 with its SwiGLU epilogue) and the kernel before
it, so that a layer's GEMVs come apart (QKV: rmsnorm after the embedding or a w2 GEMV; wo: none
after attention; w13: rmsnorm pair after none; w2: none after rmsnorm pair; with
BABYRT_FFN_FUSED=0 w13 is rmsnorm after none and w2 swiglu after rmsnorm).
"""
from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

import babyrt
from babyrt.bench import PROMPT, shape_artifacts
from babyrt.quantize import QuantConfig


def profile(shape: str, quantize: bool, new_tokens: int, top: int, cache_dir=None) -> dict:
    with tempfile.TemporaryDirectory(prefix="babyrt-prof-") as tmp:
        [(_, path)] = shape_artifacts(shape, max(512, len(PROMPT) + new_tokens), "bf16",
                                      [QuantConfig() if quantize else None], cache_dir or tmp)
        m = babyrt.load(path, device="cuda")
        for _ in range(2):
            m.generate(PROMPT, max_new_tokens=new_tokens, temperature=0.0)
        t = time.perf_counter()
        m.generate(PROMPT, max_new_tokens=new_tokens, temperature=0.0)
        stats = dict(m.last_stats)
        wall = time.perf_counter() - t
        acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=acts) as prof:
            m.generate(PROMPT, max_new_tokens=new_tokens, temperature=0.0)
            torch.cuda.synchronize()
    steps = stats["decode_steps"]
    kernels = defaultdict(lambda: [0, 0.0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA and e.device_time_total > 0:
            k = kernels[e.name[:90]]
            k[0] += 1
            k[1] += e.device_time_total
    marginal, by_role = marginal_costs(prof)
    busy = sum(v[1] for v in kernels.values())
    count = sum(v[0] for v in kernels.values())
    rows = sorted(kernels.items(), key=lambda kv: -kv[1][1])
    step_us = 1e6 * stats["decode_seconds"] / steps
    print(f"## {shape} bf16{' int8' if quantize else ''}: {stats['decode_steps'] / stats['decode_seconds']:,.0f} "
          f"tok/s, {step_us:.1f} us/step wall; kernels {count / steps:.1f}/step, GPU busy "
          f"{busy / steps:.1f} us/step (whole generate incl. prefill: {wall * 1e3:.1f} ms)")
    print("| kernel | per step | us/step | us each |")
    print("|---|---|---|---|")
    for name, (n, us) in rows[:top]:
        print(f"| {name} | {n / steps:.2f} | {us / steps:.2f} | {us / n:.2f} |")
    print("\n| kernel | per step | marginal us/step | marginal us each | head start us each | gap us/step |")
    print("|---|---|---|---|---|---|")
    for name, (n, add, head, gap) in sorted(marginal.items(), key=lambda kv: -kv[1][1])[:top]:
        print(f"| {name} | {n / steps:.2f} | {add / steps:.2f} | {add / n:.2f} | {head / n:.2f} | "
              f"{gap / steps:.2f} |")
    print("\n| kernel, after kernel | per step | marginal us/step | marginal us each | head start us each |")
    print("|---|---|---|---|---|")
    for name, (n, add, head, _) in sorted(by_role.items(), key=lambda kv: -kv[1][1])[:top]:
        print(f"| {name} | {n / steps:.2f} | {add / steps:.2f} | {add / n:.2f} | {head / n:.2f} |")
    return {"shape": shape, "int8": quantize, "tok_s": stats["decode_steps"] / stats["decode_seconds"],
            "us_per_step": step_us, "kernels_per_step": count / steps,
            "busy_us_per_step": busy / steps,
            "kernels": [{"name": k, "count": n, "us": us} for k, (n, us) in rows],
            "marginal": [{"name": k, "count": n, "us": add, "head_start_us": head, "gap_us": gap}
                         for k, (n, add, head, gap) in marginal.items()],
            "marginal_by_role": [{"name": k, "count": n, "us": add, "head_start_us": head}
                                 for k, (n, add, head, _) in by_role.items()]}


ACTS = {"0": "none", "1": "rmsnorm", "2": "swiglu"}


def short_name(name: str) -> str:
    """babyrt's kernel name without namespaces and types; a GEMV with its fused activation,
    and "pair" where its last template argument (kPair: gate and up rows in pairs) is true."""
    m = re.search(r"(\w+_kernel)\b", name)
    if not m:
        return name[:40]
    act = re.search(r"Act\)(\d)[^>]*?(\btrue)?>", name)
    if not act:
        return m.group(1)
    return f"{m.group(1)} {ACTS.get(act.group(1), act.group(1))}" + (" pair" if act.group(2) else "")


def marginal_costs(prof) -> tuple[dict, dict]:
    """Per kernel name, and per (short name, short name of the kernel before): [count, sum of
    marginal us, of head-start us, of gap us] over the kernels of the profile in start order
    (one stream at a time: a step's kernels run in order)."""
    by_stream = defaultdict(list)
    for e in prof.profiler.kineto_results.events():
        if e.device_type() == torch.autograd.DeviceType.CUDA and e.duration_ns() > 0:
            by_stream[e.device_resource_id()].append((e.start_ns(), e.end_ns(), e.name()))
    out = defaultdict(lambda: [0, 0.0, 0.0, 0.0])
    by_role = defaultdict(lambda: [0, 0.0, 0.0, 0.0])
    for events in by_stream.values():
        events.sort()
        for (_, prev_end, prev), (start, end, name) in zip(events, events[1:]):
            for k in (out[name[:90]], by_role[f"{short_name(name)}, after {short_name(prev)}"]):
                k[0] += 1
                k[1] += max(0, end - max(prev_end, start)) / 1e3
                k[2] += max(0, prev_end - start) / 1e3
                k[3] += max(0, start - prev_end) / 1e3
    return out, by_role


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="stories15M")
    p.add_argument("--quantize", choices=["int8"])
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--top", type=int, default=14)
    p.add_argument("--json")
    p.add_argument("--cache-dir", help="as babyrt bench --cache-dir (the same artifacts)")
    a = p.parse_args()
    r = profile(a.shape, a.quantize == "int8", a.new_tokens, a.top, a.cache_dir)
    if a.json:
        Path(a.json).write_text(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()
