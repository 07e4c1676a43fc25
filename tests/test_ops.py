"""babyrt's custom ops (cpp/ops) against plain PyTorch references, on the CPU and, where there
is a GPU, on CUDA: linear (float and int8, per channel and group-wise), the fused norm/SwiGLU
linears, attention with RoPE and the KV cache, and quantization itself."""
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import babyrt  # noqa: F401  (registers torch.ops.babyrt)
from conftest import Rerun, int8_activation_bound
from babyrt.quantize import QuantConfig, dequantize, quantize_weight
from babyrt.training.models.layers import apply_rope, rope_tables

ops = torch.ops.babyrt
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def reference_linear(x, w, scales=None, residual=None):
    wf = w.float() if scales is None else w.float().view(w.shape[0], scales.shape[1], -1).mul(
        scales.float().unsqueeze(-1)).view(w.shape)
    y = x.double() @ wf.double().T
    return (y if residual is None else y + residual.double()).to(x.dtype)


SHAPES = [(1, 1, 16), (1, 7, 32), (1, 288, 288), (2, 300, 96), (3, 65, 128), (4, 13, 768),
          (5, 64, 64), (17, 40, 256), (1, 5, 33)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_float_linear_equals_matmul(device, M, N, K):
    g = torch.Generator().manual_seed(M * 1000 + N + K)
    x, w, r = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g), torch.randn(M, N, generator=g)
    x, w, r = x.to(device), w.to(device), r.to(device)
    torch.testing.assert_close(ops.linear(x, w, None, None), reference_linear(x, w), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ops.linear(x, w, None, r), reference_linear(x, w, residual=r), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("M,N,K,group", [(*s, g) for s in SHAPES for g in (None, 32, 64, 128)
                                         if g is None or s[2] % g == 0])
@pytest.mark.parametrize("scale_dtype", ["fp32", "bf16"])
def test_int8_linear_equals_dequantize_then_matmul(device, M, N, K, group, scale_dtype):
    g = torch.Generator().manual_seed(M * 1000 + N + K)
    x, w, r = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g), torch.randn(M, N, generator=g)
    q, s = quantize_weight(w, group, scale_dtype)
    x, q, s, r = x.to(device), q.to(device), s.to(device), r.to(device)
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2), (torch.float16, 3e-3)):
        if device == "cpu" and dtype == torch.float16:
            continue
        xd, rd = x.to(dtype), r.to(dtype)
        want = reference_linear(xd.float(), q, s, rd.float())
        got = ops.linear(xd, q, s, rd)
        assert got.dtype == dtype and got.shape == (M, N)
        # The int8 kernels round x to int8 per block, on top of float rounding.
        act = int8_activation_bound(xd, q, s)
        assert ((got.float() - want).abs() <= act + tol * K ** 0.5 + tol * want.abs()).all()
    # batched leading dims are flattened the same way
    got3 = ops.linear(x.view(1, M, K), q, s, None)
    assert torch.equal(got3.view(M, N), ops.linear(x, q, s, None))


NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@NEEDS_CUDA
# With BABYRT_GEMV=stream, int8 from 2 MB streams through the Hopper kernel's ring: one row per
# warp (2048x5632), two (2560x2048), four (5632x2048), refills (11264x2048), 8 rows of x. The
# default kernel gives short rows of tall matrices 16, 8 or 4 lanes (32000x288, 32000x768,
# 9001x96: a row count that leaves a warp's last group part-empty, 3 rows of x). With
# BABYRT_GEMV=wide, int8 rows of 9 to 16 chunks a lane take 16 at once (2048x5632, 1000x8192).
# By default, per-channel int8 against one row of x copies one row a warp (2048x5632, 1000x8192),
# two (2560x2048), or for rows of 2,048 bytes and longer three or four (11264x2048) into shared
# memory; the others take the register kernel (32000x768), as do all with BABYRT_GEMV=regs.
# In the register kernel (BABYRT_GEMV=regs), per-channel int8 rows of 2048x5632 (one row of x)
# take 12 chunks a lane; by default too, per-channel rows that take a warp several round trips
# (11264x2048, 32000x288) load one scale a batch.
@pytest.mark.parametrize("M,N,K", [(1, 2048, 5632), (2, 5632, 2048), (8, 1000, 4096), (1, 2560, 2048),
                                   (1, 11264, 2048), (1, 32000, 288), (1, 32000, 768), (3, 9001, 96),
                                   (1, 1000, 8192)])
@pytest.mark.parametrize("weights", ["bf16", "int8", "int8-g32-bf16"])
def test_cuda_linear_large_shapes(M, N, K, weights):
    """Decode-sized GEMVs, equal to the reference and the same bits every call."""
    g = torch.Generator().manual_seed(N + K)
    x, w, r = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g), torch.randn(M, N, generator=g)
    x, r = x.cuda().bfloat16(), r.cuda().bfloat16()
    if weights == "bf16":
        q, s = w.cuda().bfloat16(), None
        want = reference_linear(x.float(), q.float(), None, r.float())
        bound = 0
    else:
        q, s = quantize_weight(w, 32 if weights.endswith("g32-bf16") else None,
                               "bf16" if weights.endswith("bf16") else "fp32")
        q, s = q.cuda(), s.cuda()
        want = reference_linear(x.float(), q, s, r.float())
        bound = int8_activation_bound(x, q, s)
    got = ops.linear(x, q, s, r)
    assert got.dtype == torch.bfloat16 and got.shape == (M, N)
    assert ((got.float() - want).abs() <= bound + 3e-2 * K ** 0.5 + 3e-2 * want.abs()).all()
    assert torch.equal(ops.linear(x, q, s, r), got)


# Opt-in CUDA switches: each reruns tests in subprocesses under its setting (below). Under any
# of them those tests skip, so that no rerun starts reruns of its own.
CUDA_SWITCHES = ("BABYRT_GEMV", "BABYRT_ATTN_LINEAR", "BABYRT_FFN_FUSED", "BABYRT_WO_EARLY", "BABYRT_FFN_EARLY",
                 "BABYRT_CARVEOUT", "BABYRT_CARVEOUT_SKIP", "BABYRT_SMEM_FLOOR")
UNDER_A_SWITCH = pytest.mark.skipif(any(os.environ.get(s) for s in CUDA_SWITCHES),
                                    reason="already running under an opt-in switch")
GEMV_TESTS = [(Path(__file__), "cuda and (linear or fused)")]


def op_and_generation_tests(op_tests: str) -> list:
    """The op tests of this file that op_tests selects, then the CUDA generation tests (greedy
    parity with the CPU, batches, graphs)."""
    return [(Path(__file__), op_tests), (Path(__file__).with_name("test_cuda.py"), "greedy or batch or graph")]


RERUNS = {  # setting: the (file, -k selection) pairs it reruns
    "BABYRT_GEMV=stream": GEMV_TESTS, "BABYRT_GEMV=wide": GEMV_TESTS, "BABYRT_GEMV=regs": GEMV_TESTS,
    "BABYRT_GEMV=small": GEMV_TESTS,
    "BABYRT_ATTN_LINEAR=1": op_and_generation_tests("attention_linear"),
    "BABYRT_FFN_FUSED=0": op_and_generation_tests("ffn_block"),
    "BABYRT_WO_EARLY=0": op_and_generation_tests("attention_block"),
    "BABYRT_FFN_EARLY=1": op_and_generation_tests("ffn_block"),
    "BABYRT_CARVEOUT=100": op_and_generation_tests("attention_block or ffn_block"),
    "BABYRT_SMEM_FLOOR=32768": op_and_generation_tests("attention_block or ffn_block"),
}


@pytest.fixture(scope="module")
def cuda_reruns(request):
    """The reruns of the settings that the selected tests ask for (marker `rerun`), all started
    on first use, so that they overlap on the GPU machine (one after another they took most of
    the GPU tests' time)."""
    wanted = {m.args[0] for item in request.session.items for m in item.iter_markers("rerun")}
    runs = {}
    for setting in sorted(wanted):
        name, value = setting.split("=", 1)
        runs[setting] = [Rerun({name: value}, path, select) for path, select in RERUNS[setting]]
    yield runs
    for started in runs.values():
        for r in started:
            r.stop()


def assert_reruns_pass(request, cuda_reruns):
    for r in cuda_reruns[request.node.get_closest_marker("rerun").args[0]]:
        code, out = r.result()
        assert code == 0, out[-6000:]  # room for the stacks of a rerun ended at its deadline


def rerun(setting: str, id: str):
    return pytest.param(setting, marks=pytest.mark.rerun(setting), id=id)


@NEEDS_CUDA
@UNDER_A_SWITCH
@pytest.mark.parametrize("setting", [rerun("BABYRT_GEMV=stream", "stream"), rerun("BABYRT_GEMV=wide", "wide"),
                                     rerun("BABYRT_GEMV=regs", "regs"), rerun("BABYRT_GEMV=small", "small")])
def test_cuda_gemv_variant(setting, request, cuda_reruns):
    """The opt-in GEMVs pass the CUDA linear tests too. BABYRT_GEMV=stream: the streamed GEMV
    (bulk copies into a shared-memory ring) for int8 weights from 2 MB on Hopper; =wide: 16
    chunks a lane at 2 blocks an SM for int8 rows of 9 to 16 chunks a lane; =regs: the register
    kernel for the per-channel int8 rows that the row-buffer kernel takes by default; =small: 4
    chunks a lane at 4 blocks an SM for one row of x against short float rows."""
    assert_reruns_pass(request, cuda_reruns)


@NEEDS_CUDA
@UNDER_A_SWITCH
@pytest.mark.rerun("BABYRT_ATTN_LINEAR=1")
def test_cuda_attention_linear_kernel(request, cuda_reruns):
    """BABYRT_ATTN_LINEAR=1 (opt-in): attention_linear as one CUDA kernel passes the op tests,
    and the CUDA generation tests (greedy parity with the CPU, batches, graphs) run through it."""
    assert_reruns_pass(request, cuda_reruns)


@NEEDS_CUDA
@UNDER_A_SWITCH
@pytest.mark.rerun("BABYRT_FFN_FUSED=0")
def test_cuda_ffn_block_unfused(request, cuda_reruns):
    """BABYRT_FFN_FUSED=0 (ffn_block as its two ops' kernels, kept to measure against) passes
    the op tests, and the CUDA generation tests (greedy parity with the CPU, batches, graphs)
    run through it."""
    assert_reruns_pass(request, cuda_reruns)


@NEEDS_CUDA
@UNDER_A_SWITCH
@pytest.mark.parametrize("setting", [rerun("BABYRT_WO_EARLY=0", "wo-late"), rerun("BABYRT_FFN_EARLY=1", "ffn-early")])
def test_cuda_launch_order(setting, request, cuda_reruns):
    """The kernels' launch order under programmatic dependent launch changes no result:
    BABYRT_WO_EARLY=0 (attention_block's wo GEMV lets the next kernel launch only after its own
    wait, the order of the plain ops) and BABYRT_FFN_EARLY=1 (opt-in: ffn_block's two GEMVs let
    it launch before theirs) pass the op tests and the CUDA generation tests (greedy parity with
    the CPU, batches, graphs: many steps, where a read of a buffer still being written would show)."""
    assert_reruns_pass(request, cuda_reruns)


@NEEDS_CUDA
@UNDER_A_SWITCH
@pytest.mark.parametrize("setting", [rerun("BABYRT_CARVEOUT=100", "carveout"),
                                     rerun("BABYRT_SMEM_FLOOR=32768", "smem-floor")])
def test_cuda_shared_memory_split(setting, request, cuda_reruns):
    """Which kernels' blocks share an SM changes no result: BABYRT_CARVEOUT=100 (every kernel
    but the int8 row-buffer GEMVs prefers all shared memory, so they run under one L1 / shared
    split and the next kernel's blocks start beside the previous one's) and
    BABYRT_SMEM_FLOOR=32768 (every launch takes at least 32 KB of shared memory, fewer blocks an
    SM) pass the layer ops' tests and the CUDA generation tests (greedy parity with the CPU,
    batches, graphs)."""
    assert_reruns_pass(request, cuda_reruns)


def test_quantize_error_is_within_half_a_step():
    w = torch.randn(96, 256)
    for group in (None, 32, 64, 128):
        q, s = quantize_weight(w, group)
        assert q.dtype == torch.int8 and q.abs().max() <= 127
        assert s.shape == (96, 1 if group is None else 256 // group)
        err = (dequantize(q, s) - w).abs().view(96, s.shape[1], -1)
        assert (err <= s.unsqueeze(-1) / 2 + 1e-6).all()
    with pytest.raises(ValueError, match="does not divide"):
        quantize_weight(torch.randn(4, 48), 32)
    with pytest.raises(ValueError, match="positive int"):
        quantize_weight(torch.randn(4, 48), 0)
    with pytest.raises(ValueError, match="group_size"):
        QuantConfig(group_size=0)


@pytest.mark.parametrize("device", DEVICES)
def test_fused_norm_and_swiglu_linears(device):
    torch.manual_seed(0)
    x, nw, w = torch.randn(2, 3, 48), torch.rand(48) + 0.5, torch.randn(40, 48)
    x, nw, w = x.to(device), nw.to(device), w.to(device)
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * nw
    torch.testing.assert_close(ops.rmsnorm_linear(x, nw, 1e-5, w, None), normed @ w.T, atol=1e-4, rtol=1e-4)
    h, w2, r = torch.randn(1, 1, 96).to(device), torch.randn(48, 48).to(device), torch.randn(1, 1, 48).to(device)
    want = (F.silu(h[..., :48]) * h[..., 48:]) @ w2.T + r
    torch.testing.assert_close(ops.swiglu_linear(h, w2, None, r), want, atol=1e-4, rtol=1e-4)


def reference_attention(qkv, positions, cos, sin, kc, vc, H, KV):
    """The training model's path: training/models/layers.py RoPE, cache scatter, masked SDPA."""
    B, T = qkv.shape[:2]
    D = kc.shape[-1]
    q, k, v = qkv.split([H * D, KV * D, KV * D], -1)
    q, k, v = q.view(B, T, H, D), k.view(B, T, KV, D), v.view(B, T, KV, D)
    c, s = cos[positions], sin[positions]
    q, k = apply_rope(q, c, s), apply_rope(k, c, s)
    idx = positions[:, None, :, None].expand(B, KV, T, D)
    kc.scatter_(2, idx, k.transpose(1, 2))
    vc.scatter_(2, idx, v.transpose(1, 2))
    mask = torch.arange(kc.shape[2])[None, None, None, :].to(positions.device) <= positions[:, None, :, None]
    kk, vv = kc.repeat_interleave(H // KV, 1), vc.repeat_interleave(H // KV, 1)
    y = F.scaled_dot_product_attention(q.transpose(1, 2), kk, vv, attn_mask=mask)
    return y.transpose(1, 2).reshape(B, T, H * D)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("H,KV", [(4, 4), (6, 2), (8, 1)])
@pytest.mark.parametrize("D", [16, 48, 40])  # 40: no AVX-512 kernel for that head size
def test_attention_prefill_then_decode(device, H, KV, D):
    torch.manual_seed(H + KV + D)
    B, S = 2, 48
    cos, sin = rope_tables(D, S, 10000.0)
    cos, sin = cos.to(device), sin.to(device)
    caches = [torch.zeros(B, KV, S, D, device=device) for _ in range(4)]
    # More than 16 filled slots, so that the exponential runs whole vectors and a masked tail.
    steps = [torch.arange(19).repeat(B, 1), torch.tensor([[19], [19]]),
             torch.tensor([[20, 21, 22], [20, 21, 22]])]
    for positions in steps:
        positions = positions.to(device)
        qkv = torch.randn(B, positions.shape[1], (H + 2 * KV) * D, device=device)
        got = ops.attention(qkv, positions, cos, sin, caches[0], caches[1], H, KV)
        want = reference_attention(qkv, positions, cos, sin, caches[2], caches[3], H, KV)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(caches[0], caches[2], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(caches[1], caches[3])


def decode_case(device, dtype, H, KV, D, B=3, S=300):
    """Three sequences at positions 0, 17 and 299 of caches of S random slots, and the RoPE
    tables: (cos, sin, caches, copies of the caches, positions)."""
    opt = dict(device=device, dtype=dtype)
    cos, sin = (t.to(device) for t in rope_tables(D, S, 10000.0))
    caches = [torch.randn(B, KV, S, D, **opt) for _ in range(2)]
    positions = torch.tensor([[0], [17], [299]], device=device)
    return cos, sin, caches, [c.clone() for c in caches], positions


def weight_as(w, weights, device, dtype):
    """(weight, scales) of fp32 w as a test's weights: "float" (in dtype), "int8" (per channel,
    fp32 scales) or "int8-g32-bf16" (group 32, bf16 scales)."""
    if weights == "float":
        return w.to(device=device, dtype=dtype), None
    q, s = quantize_weight(w, 32 if "g32" in weights else None, "bf16" if "bf16" in weights else "fp32")
    return q.to(device), s.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("H,KV,D", [(6, 6, 48), (12, 12, 64), (4, 2, 128), (32, 4, 64)])
@pytest.mark.parametrize("weights", ["float", "int8", "int8-g32-bf16"])
def test_attention_linear_equals_attention_then_linear(device, dtype, H, KV, D, weights):
    """attention_linear equals attention, then linear with the residual: output and cache, the
    same bits every call. With BABYRT_ATTN_LINEAR=1 (test_cuda_attention_linear_kernel) CUDA
    runs it as one kernel at decode (a cluster of blocks, one per head, up to 16 heads;
    (32, 4, 64) runs the two ops), which computes the product in fp32 where the int8 GEMV
    rounds the attention output to int8 per 16 values. Sequences at positions 0, 17 and 299:
    the kernel copies their slots into shared memory where they fit and reads the cache where
    they do not (D 128 at 299)."""
    torch.manual_seed(H + D)
    B, dim = 3, 96
    opt = dict(device=device, dtype=dtype)
    cos, sin, caches, ref_caches, positions = decode_case(device, dtype, H, KV, D, B)
    qkv = torch.randn(B, 1, (H + 2 * KV) * D, **opt)
    residual = torch.randn(B, 1, dim, **opt)
    q, s = weight_as(torch.randn(dim, H * D) * (H * D) ** -0.5, weights, device, dtype)
    got = ops.attention_linear(qkv, positions, cos, sin, *caches, H, KV, q, s, residual)
    y = ops.attention(qkv, positions, cos, sin, *ref_caches, H, KV)
    want = ops.linear(y, q, s, residual)
    assert got.dtype == dtype and got.shape == (B, 1, dim)
    torch.testing.assert_close(caches[0], ref_caches[0], atol=0, rtol=0)
    torch.testing.assert_close(caches[1], ref_caches[1], atol=0, rtol=0)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    bound = tol + tol * want.float().abs()
    if s is not None and device == "cuda":  # the GEMV's int8 rounding of y, which the kernel skips
        bound = bound + int8_activation_bound(y.view(B, -1), q, s).view(B, 1, dim)
    assert ((got.float() - want.float()).abs() <= bound).all()
    again = ops.attention_linear(qkv, positions, cos, sin, *caches, H, KV, q, s, residual)
    assert torch.equal(again, got)
    with pytest.raises(RuntimeError, match="does not fit"):
        ops.attention_linear(qkv, positions, cos, sin, *caches, H, KV, q[:, 1:], None, residual)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("H,KV,D", [(6, 6, 48), (12, 12, 64), (4, 2, 128), (32, 4, 64)])
@pytest.mark.parametrize("weights", ["float", "int8", "int8-g32-bf16"])
def test_attention_block_equals_its_parts(device, dtype, H, KV, D, weights):
    """attention_block(x) equals attention_linear(rmsnorm_linear(x), ..., residual=x), exactly:
    output and cache, the same bits every call; its shapes are checked. Sequences at positions
    0, 17 and 299 (the attention kernel copies their slots into shared memory where they fit and
    reads the cache where they do not)."""
    torch.manual_seed(H + D)
    B, dim = 3, 128
    cos, sin, caches, ref_caches, positions = decode_case(device, dtype, H, KV, D, B)
    x = torch.randn(B, 1, dim, device=device, dtype=dtype)
    norm = (1 + 0.1 * torch.randn(dim)).to(device=device, dtype=dtype)
    qw, qs = weight_as(torch.randn((H + 2 * KV) * D, dim) * dim ** -0.5, weights, device, dtype)
    ow, os_ = weight_as(torch.randn(dim, H * D) * (H * D) ** -0.5, weights, device, dtype)
    got = ops.attention_block(x, norm, 1e-5, qw, qs, positions, cos, sin, *caches, H, KV, ow, os_)
    qkv = ops.rmsnorm_linear(x, norm, 1e-5, qw, qs)
    want = ops.attention_linear(qkv, positions, cos, sin, *ref_caches, H, KV, ow, os_, x)
    assert got.dtype == dtype and got.shape == (B, 1, dim)
    assert torch.equal(caches[0], ref_caches[0]) and torch.equal(caches[1], ref_caches[1])
    assert torch.equal(got, want)
    again = ops.attention_block(x, norm, 1e-5, qw, qs, positions, cos, sin, *caches, H, KV, ow, os_)
    assert torch.equal(again, got)
    with pytest.raises(RuntimeError, match="does not fit"):
        ops.attention_block(x, norm, 1e-5, qw[:, 1:], None, positions, cos, sin, *caches, H, KV, ow, os_)
    with pytest.raises(RuntimeError, match="does not fit"):
        ops.attention_block(x, norm, 1e-5, qw[1:], qs[1:] if qs is not None else None, positions, cos,
                            sin, *caches, H, KV, ow, os_)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("weights", ["float", "int8", "int8-g32-bf16"])
@pytest.mark.parametrize("B,T", [(1, 1), (3, 1), (3, 5)])
def test_ffn_block_equals_its_parts(device, dtype, weights, B, T):
    """ffn_block(x) equals swiglu_linear(rmsnorm_linear(x), w2, residual=x), exactly, the same
    bits every call, at decode (T 1) and over several tokens; its shapes are checked. CUDA
    (unless BABYRT_FFN_FUSED=0, test_cuda_ffn_block_unfused) runs up to 8 rows of x through the w13
    GEMV with a SwiGLU epilogue, which takes gate and up rows in pairs (one 16-bit row against
    per-channel int8 rows: in a warp's row buffer; else 16 lanes a row or fewer): where the two
    ops' GEMV gives a row 32 lanes its sums run in another order, so that path is held to the two
    ops within a tolerance instead."""
    torch.manual_seed(B * T)
    dim, hidden = 128, 352
    x = torch.randn(B, T, dim, device=device, dtype=dtype)
    norm = (1 + 0.1 * torch.randn(dim)).to(device=device, dtype=dtype)
    w13, s13 = weight_as(torch.randn(2 * hidden, dim) * dim ** -0.5, weights, device, dtype)
    w2, s2 = weight_as(torch.randn(dim, hidden) * hidden ** -0.5, weights, device, dtype)
    got = ops.ffn_block(x, norm, 1e-5, w13, s13, w2, s2)
    want = ops.swiglu_linear(ops.rmsnorm_linear(x, norm, 1e-5, w13, s13), w2, s2, x)
    assert got.dtype == dtype and got.shape == (B, T, dim)
    if device == "cuda" and os.environ.get("BABYRT_FFN_FUSED") != "0" and B * T <= 8:
        tol = 1e-4 if dtype == torch.float32 and weights == "float" else 5e-2
        torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
    else:
        assert torch.equal(got, want)
    assert torch.equal(ops.ffn_block(x, norm, 1e-5, w13, s13, w2, s2), got)
    with pytest.raises(RuntimeError, match="does not fit"):
        ops.ffn_block(x, norm, 1e-5, w13[:, 1:], None, w2, s2)
    with pytest.raises(RuntimeError, match="an even count"):
        ops.ffn_block(x, norm, 1e-5, w13[1:], s13[1:] if s13 is not None else None, w2, s2)
    with pytest.raises(RuntimeError, match="does not fit"):  # w2's input is not w13's hidden
        ops.ffn_block(x, norm, 1e-5, w13[2:], s13[2:] if s13 is not None else None, w2, s2)
    with pytest.raises(RuntimeError, match="residual"):  # w2's output is not x's width
        ops.ffn_block(x, norm, 1e-5, w13, s13, w2[1:], s2[1:] if s2 is not None else None)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("weights", ["float", "int8", "int8-g32-bf16"])
def test_embedding(device, dtype, weights):
    """Rows of the table (dequantized: int8 times its group scale, in fp32), as dtype."""
    torch.manual_seed(2)
    table = torch.randn(50, 96, device=device)
    tokens = torch.tensor([[3, 0, 49], [7, 7, 1]], device=device)
    w, s = weight_as(table, weights, device, dtype)
    want = w[tokens] if s is None else dequantize(w, s)[tokens].to(dtype)
    got = ops.embedding(tokens, w, s, dtype)
    assert got.dtype == dtype and got.shape == (2, 3, 96)
    assert torch.equal(got, want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("int8", [False, True])
def test_rmsnorm_linear_out_dtype(device, dtype, int8):
    """out_dtype=fp32 (the classifier's logits) is the x-dtype result widened, exactly."""
    torch.manual_seed(1)
    x = torch.randn(1, 1, 96, device=device, dtype=dtype)
    nw = torch.randn(96, device=device, dtype=dtype)
    w = torch.randn(200, 96, device=device)
    w, s = quantize_weight(w) if int8 else (w.to(dtype), None)
    got = ops.rmsnorm_linear(x, nw, 1e-5, w, s, torch.float32)
    assert got.dtype == torch.float32 and got.shape == (1, 1, 200)
    assert torch.equal(got, ops.rmsnorm_linear(x, nw, 1e-5, w, s).float())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("V", [5, 1001, 32000])
def test_greedy_advance(device, V):
    """A greedy step's bookkeeping: token = argmax (first of ties, NaN wins as in torch.argmax),
    position + 1, history[position] = token, and nothing else written."""
    torch.manual_seed(V)
    B, L = 4, 20
    logits = torch.randn(B, V, device=device)
    logits[1, V // 2] = logits[1, V - 1] = 1e9           # a tie: the first index wins
    logits[2, V - 1] = float("nan")
    logits[2, max(V - 3, 0)] = float("nan")               # NaNs: the first NaN wins
    token = torch.zeros(B, 1, dtype=torch.long, device=device)
    position = torch.tensor([[0], [5], [18], [7]], device=device)
    history = torch.full((B, L), -1, dtype=torch.long, device=device)
    ops.greedy_advance(logits, token, position, history)
    want = logits.cpu().argmax(-1)
    assert want[1] == V // 2 and want[2] == max(V - 3, 0)
    assert token.cpu().flatten().tolist() == want.tolist()
    assert position.cpu().flatten().tolist() == [1, 6, 19, 8]
    expect = torch.full((B, L), -1, dtype=torch.long)
    expect[torch.arange(B), torch.tensor([1, 6, 19, 8])] = want
    assert torch.equal(history.cpu(), expect)
    with pytest.raises(RuntimeError, match="greedy_advance"):
        ops.greedy_advance(logits, token.view(B, 1, 1), position, history)


def test_ops_reject_bad_shapes():
    x, w = torch.randn(1, 8), torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="does not fit"):
        ops.linear(torch.randn(1, 9), w, None, None)
    with pytest.raises(RuntimeError, match="need scales"):
        ops.linear(x, w.to(torch.int8), None, None)
    with pytest.raises(RuntimeError, match="scales of shape"):
        ops.linear(x, w.to(torch.int8), torch.ones(4, 3), None)
    with pytest.raises(RuntimeError, match="residual"):
        ops.linear(x, w, None, torch.randn(1, 5))
    kc = torch.zeros(1, 2, 4, 8)
    with pytest.raises(RuntimeError, match="outside the cache"):
        ops.attention(torch.randn(1, 1, 48), torch.tensor([[4]]), None, None, kc, kc.clone(), 2, 2)
    with pytest.raises(RuntimeError, match="n_kv_heads"):
        ops.attention(torch.randn(1, 1, 48), torch.tensor([[0]]), None, None, kc, kc.clone(), 3, 2)


@pytest.mark.skipif(bool(os.environ.get("BABYRT_CPU_ISA")), reason="already running capped")
@pytest.mark.parametrize("isa", ["avx512", "avx2", "scalar"])
def test_every_cpu_kernel_variant(isa):
    """The CPU picks its best kernels; capping the ISA runs the others through the same tests."""
    run = Rerun({"BABYRT_CPU_ISA": isa}, __file__, "cpu and (linear or fused or attention) or isa_cap")
    try:
        code, out = run.result()
    finally:
        run.stop()  # its log file and temporary directory
    assert code == 0, out[-3000:]


def test_rerun_past_its_deadline_fails_with_its_stack(tmp_path, monkeypatch):
    """A rerun that hangs (a kernel that never returns, say) is ended at its deadline and fails
    its test with the hung test's stack, instead of holding up the suite."""
    (tmp_path / "test_hangs.py").write_text("import time\n\ndef test_hangs():\n    time.sleep(120)\n")
    monkeypatch.setenv("BABYRT_RERUN_TIMEOUT", "3")
    run = Rerun({}, tmp_path / "test_hangs.py", "hangs")
    try:
        code, out = run.result()
    finally:
        run.stop()
    assert code != 0 and out.endswith("(rerun ended at its deadline: BABYRT_RERUN_TIMEOUT)")
    assert 'test_hangs.py", line 4 in test_hangs' in out  # where it hung


def test_cpu_isa_cap_is_obeyed():
    cap = os.environ.get("BABYRT_CPU_ISA")
    isa = ops.cpu_isa()
    assert isa in ("avx512-vnni", "avx512", "avx2", "scalar")
    if cap:
        assert isa in (cap, "scalar")  # scalar if the CPU lacks the capped set
