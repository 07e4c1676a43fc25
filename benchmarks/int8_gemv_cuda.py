"""Bandwidth of babyrt's CUDA int8 linear at batch 1 (decode), against the device-to-device
copy bandwidth measured in the same run, for the 1B shape's two FFN matrices.

    python benchmarks/int8_gemv_cuda.py [--shapes NxK,...] [--json OUT]

The kernels launch with programmatic dependent launch; BABYRT_PDL=0 turns it off to compare.
Each timing is a CUDA-event measurement of a CUDA graph of 200 back-to-back calls (so that
host launch overhead is out of the picture; babyrt.bench.cuda_graph_seconds), cycling through
enough copies of the weights (> 4x the L2 cache) that every call reads its weights from HBM.
"""
import argparse
import json

import torch

from babyrt.bench import copy_bandwidth, cuda_graph_seconds
from babyrt.quantize import quantize_weight


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    # The last default, a tiny shape, shows the fixed cost of one call (launch, ramp-up, drain).
    ap.add_argument("--shapes", default="2048x5632,5632x2048,64x256",
                    help="comma-separated NxK weight shapes (N outputs, K inputs)")
    a = ap.parse_args()
    copy_bw = copy_bandwidth("cuda")
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    rows = []
    for N, K in (tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",")):
        n_copies = max(4, 4 * l2 // (N * K) + 1)
        qs = [quantize_weight(torch.randn(N, K, device="cuda")) for _ in range(n_copies)]
        ws = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) for _ in range(n_copies)]
        x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
        t_q8 = cuda_graph_seconds(lambda i: torch.ops.babyrt.linear(x, *qs[i], None), n_copies)
        t_bf16 = cuda_graph_seconds(lambda i: torch.nn.functional.linear(x, ws[i]), n_copies)
        t_ours = cuda_graph_seconds(lambda i: torch.ops.babyrt.linear(x, ws[i], None, None), n_copies)
        want = x.float() @ torch.ops.babyrt.dequantize(*qs[0]).T
        got = torch.ops.babyrt.linear(x, *qs[0], None).float()
        err = ((got - want).abs().max() / want.abs().max()).item()
        q_bytes = N * K + qs[0][1].nbytes
        row = {"shape": f"{N}x{K}", "int8_us": t_q8 * 1e6, "int8_gb_s": q_bytes / t_q8 / 1e9,
               "int8_pct_copy_bw": 100 * q_bytes / t_q8 / copy_bw, "bf16_us": t_bf16 * 1e6,
               "bf16_gb_s": 2 * N * K / t_bf16 / 1e9, "bf16_babyrt_us": t_ours * 1e6,
               "bf16_babyrt_gb_s": 2 * N * K / t_ours / 1e9, "max_rel_err_vs_dequant": err}
        rows.append(row)
        print(f"{row['shape']}: int8 {row['int8_us']:.2f} us, {row['int8_gb_s']:.0f} GB/s "
              f"({row['int8_pct_copy_bw']:.0f}% of copy {copy_bw / 1e9:.0f} GB/s); "
              f"bf16 cuBLAS {row['bf16_us']:.2f} us, {row['bf16_gb_s']:.0f} GB/s; "
              f"bf16 babyrt {row['bf16_babyrt_us']:.2f} us, {row['bf16_babyrt_gb_s']:.0f} GB/s; "
              f"max error {err:.1e} of max |y| (bf16 output)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "copy_gb_s": copy_bw / 1e9,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
