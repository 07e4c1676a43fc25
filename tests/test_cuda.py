"""CUDA path of the runtime. Runs on the GPU machine (tools/gpu_check.sh); skips elsewhere."""
import os
import subprocess
import sys

import pytest
import torch

import babyrt
from conftest import int8_activation_bound

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")


def test_cuda_fp32_greedy_equals_cpu(gqa_model):
    _, art, _ = gqa_model
    cpu = babyrt.load(art).generate("Return the", max_new_tokens=64, temperature=0)
    cuda = babyrt.load(art, device="cuda", dtype="fp32")
    assert cuda.device.startswith("cuda")
    assert cuda.generate("Return the", max_new_tokens=64, temperature=0) == cpu


def test_cuda_logits_close_to_cpu(gqa_model, corpus_text):
    model, art, tok = gqa_model
    ids = tok.encode(corpus_text[:40])
    cpu = babyrt.load(art).logits(ids, prefill=5)
    gpu = babyrt.load(art, device="cuda").logits(ids, prefill=5)
    assert (gpu - cpu).abs().max() < 1e-3
    bf16 = babyrt.load(art, device="cuda", dtype="bf16")
    assert bf16.dtype == "bf16"
    assert (bf16.logits(ids) - cpu).abs().max() < 0.1


def test_cuda_sampling_is_seeded(gqa_model):
    rt = babyrt.load(gqa_model[1], device="cuda")
    kw = dict(max_new_tokens=40, temperature=1.0, top_p=0.9, seed=5)
    assert rt.generate("Return", **kw) == rt.generate("Return", **kw)


def test_bad_cuda_index(gqa_model):
    with pytest.raises(babyrt.DeviceError, match="does not exist"):
        babyrt.load(gqa_model[1], device=f"cuda:{torch.cuda.device_count()}")


def test_cuda_out_of_memory_is_a_clear_error_and_the_process_goes_on(tmp_path, gqa_model):
    from test_hardening import huge_cache_artifact
    rt = babyrt.load(huge_cache_artifact(tmp_path, gqa_model), device="cuda")
    with pytest.raises(babyrt.DeviceError, match="cannot allocate the KV cache"):
        rt.generate("Return", max_new_tokens=2)
    ok = babyrt.load(gqa_model[1], device="cuda")
    assert len(ok.generate("Return", max_new_tokens=8, temperature=0)) == 8


@pytest.fixture(scope="module")
def trained_artifact(tmp_path_factory, corpus_file):
    """A small LLaMA 2 trained on the GPU for a few hundred steps, exported in fp32."""
    from babyrt.export import export_checkpoint
    from babyrt.training.trainer import train
    tmp = tmp_path_factory.mktemp("trained")
    train(corpus_file, tmp / "ckpt", "llama2", preset="tiny", progress=False,
          model_overrides={"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                           "context_length": 128},
          train_overrides={"max_steps": 300, "device": "cuda", "batch_size": 32})
    return export_checkpoint(tmp / "ckpt", tmp / "artifact")["path"]


def test_cuda_graph_greedy_equals_cpu_on_a_trained_model(trained_artifact):
    """The bar: 64 greedy tokens on CUDA (fp32, CUDA graph replays, on-device sampling) equal
    the CPU's. 200 tokens run past the 128-token context, so sliding is covered too."""
    cpu = babyrt.load(trained_artifact)
    gpu = babyrt.load(trained_artifact, device="cuda", dtype="fp32")
    for prompt in ("The ", "Return a new"):
        assert gpu.generate(prompt, max_new_tokens=64, temperature=0) == \
            cpu.generate(prompt, max_new_tokens=64, temperature=0)
    long_cpu = cpu.generate("The ", max_new_tokens=200, temperature=0)
    long_gpu = gpu.generate("The ", max_new_tokens=200, temperature=0)
    assert long_gpu[:120] == long_cpu[:120]
    assert len(long_gpu) == 200 and gpu.last_stats["finish_reason"] == "length"


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_cuda_batch_of_8_equals_8_single_runs(trained_artifact, dtype):
    from test_batch import PROMPTS
    rt = babyrt.load(trained_artifact, device="cuda", dtype=dtype)
    singles = [rt.generate(p, max_new_tokens=48, temperature=0) for p in PROMPTS]
    assert rt.generate_batch(PROMPTS, max_new_tokens=48, temperature=0) == singles
    assert [s["generated_tokens"] for s in rt.last_stats] == [48] * 8


def test_cuda_device_sampling(trained_artifact):
    rt = babyrt.load(trained_artifact, device="cuda")
    greedy = rt.generate("The ", max_new_tokens=40, temperature=0)
    assert rt.generate("The ", max_new_tokens=40, temperature=2.0, top_k=1, seed=1) == greedy
    assert rt.generate("The ", max_new_tokens=40, temperature=1.0, top_p=1e-6, seed=1) == greedy
    kw = dict(max_new_tokens=40, temperature=1.0, top_k=20, top_p=0.9)
    a = rt.generate("The ", seed=7, **kw)
    assert a == rt.generate("The ", seed=7, **kw) and a != rt.generate("The ", seed=8, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M", [1, 3, 8, 20])
@pytest.mark.parametrize("N", [864, 9001])
@pytest.mark.parametrize("K", [288, 5632])
def test_cuda_fused_decode_ops_match_references(dtype, M, N, K):
    """The GEMV kernels with their RMSNorm / SwiGLU prologues and residual epilogue, float and
    int8 weights, against the ATen references run on the same inputs. 9001 rows of 288 take 8
    lanes a row (several rows a warp, the last group part-empty); 864 take 32. Rows of 5632
    take 32 lanes, and 12 chunks a lane for one row of x and per-channel int8. 20 rows of x (a
    short prompt's prefill) run as launches of 8, 8 and 4."""
    from babyrt.quantize import quantize_weight
    ops = torch.ops.babyrt
    torch.manual_seed(M + K)
    x = torch.randn(M, K, device="cuda", dtype=dtype)
    nw = (torch.rand(K, device="cuda") + 0.5).to(dtype)
    w = torch.randn(N, K, device="cuda", dtype=dtype) / K ** 0.5
    r = torch.randn(M, N, device="cuda", dtype=dtype)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    normed = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype) * nw
    torch.testing.assert_close(ops.rmsnorm_linear(x, nw, 1e-5, w, None), normed @ w.T, **tol)
    torch.testing.assert_close(ops.linear(x, w, None, r), x @ w.T + r, **tol)
    h = torch.randn(M, 2 * K, device="cuda", dtype=dtype)
    act = torch.nn.functional.silu(h[:, :K]) * h[:, K:]
    torch.testing.assert_close(ops.swiglu_linear(h, w, None, r), act @ w.T + r, **tol)
    for group in (None, 32):
        q, s = quantize_weight(w.float(), group)
        wq = ops.dequantize(q, s).to(dtype)
        # The kernel quantizes act(x) to int8 per 16 values: allow for that rounding.
        for got, xin, want in ((ops.rmsnorm_linear(x, nw, 1e-5, q, s), normed, normed @ wq.T),
                               (ops.swiglu_linear(h, q, s, r), act, act @ wq.T + r)):
            bound = int8_activation_bound(xin, q, s) + tol["atol"] + tol["rtol"] * want.abs().float()
            assert ((got.float() - want.float()).abs() <= bound).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("H,KV,D", [(6, 6, 48), (32, 4, 64), (4, 2, 128), (2, 1, 256)])
def test_cuda_decode_attention_matches_reference(dtype, H, KV, D):
    """The decode kernel (one token per sequence, sequences at different positions) against
    the reference path, including the cache it writes. The kernel copies the filled slots into
    shared memory where they fit (96 KB: bf16 D 64 holds 361 slots, its K rows padded by 16
    bytes) and reads the cache where they do not (position 299 with D 128, or fp32 D 48): both
    paths run here. D 256 in fp32 gives each lane two 16-byte chunks of a row."""
    from test_ops import reference_attention
    from babyrt.training.models.layers import rope_tables
    torch.manual_seed(H + D)
    B, S = 3, 300
    cos, sin = (t.cuda() for t in rope_tables(D, S, 10000.0))
    kc = torch.randn(B, KV, S, D, device="cuda", dtype=dtype)
    vc = torch.randn_like(kc)
    kr, vr = kc.clone(), vc.clone()
    positions = torch.tensor([[0], [17], [299]], device="cuda")
    qkv = torch.randn(B, 1, (H + 2 * KV) * D, device="cuda", dtype=dtype)
    got = torch.ops.babyrt.attention(qkv, positions, cos, sin, kc, vc, H, KV)
    kr, vr = kr.float(), vr.float()  # the reference writes its cache in fp32
    want = reference_attention(qkv.float(), positions, cos, sin, kr, vr, H, KV)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got.float(), want, **tol)
    torch.testing.assert_close(kc.float(), kr, **tol)
    torch.testing.assert_close(vc.float(), vr, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("H,KV,D", [(6, 6, 48), (32, 4, 64)])
def test_cuda_prefill_attention_matches_reference(dtype, H, KV, D):
    """Several tokens per sequence (the prefill kernel for RoPE and the cache writes, then
    SDPA over the cache with grouped heads) against the reference path, cache included: two
    sequences, one continuing at position 40 over slots already filled."""
    from test_ops import reference_attention
    from babyrt.training.models.layers import rope_tables
    torch.manual_seed(H + D)
    B, S, T = 2, 64, 16
    cos, sin = (t.cuda() for t in rope_tables(D, S, 10000.0))
    kc = torch.randn(B, KV, S, D, device="cuda", dtype=dtype)
    vc = torch.randn_like(kc)
    kr, vr = kc.float(), vc.float()  # the reference writes its cache in fp32
    positions = torch.stack([torch.arange(T), torch.arange(40, 40 + T)]).cuda()
    qkv = torch.randn(B, T, (H + 2 * KV) * D, device="cuda", dtype=dtype)
    got = torch.ops.babyrt.attention(qkv, positions, cos, sin, kc, vc, H, KV)
    want = reference_attention(qkv.float(), positions, cos, sin, kr, vr, H, KV)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    assert got.shape == (B, T, H * D) and got.dtype == dtype
    torch.testing.assert_close(got.float(), want, **tol)
    torch.testing.assert_close(kc.float(), kr, **tol)
    torch.testing.assert_close(vc.float(), vr, **tol)


def _step_model(case: str, dtype: torch.dtype):
    """A small random FusedLlama on CUDA, float weights in dtype (as the runtime converts them:
    parameters only; int8 weights, scales and RoPE tables stay as they are)."""
    from babyrt.fused_llama import FusedLlama
    from babyrt.quantize import QuantConfig
    from babyrt.training.models.llama import Llama, LlamaConfig
    torch.manual_seed(0)
    shape = dict(vocab_size=320, dim=128, n_layers=3, n_heads=4, n_kv_heads=2, hidden_dim=384,
                 context_length=64, tie_embeddings=True)
    if case == "mha-untied":
        shape.update(n_kv_heads=4, tie_embeddings=False)
    quant = {"int8": QuantConfig(),
             "int8-g32-bf16-float-classifier": QuantConfig(group_size=32, scale_dtype="bf16",
                                                            classifier=False, embedding=True),
             "int8-g64-untied": QuantConfig(group_size=64, embedding=True)}.get(case)
    if case == "int8-g64-untied":
        shape.update(tie_embeddings=False)
    m = FusedLlama(Llama(LlamaConfig(**shape)).eval(), quant)
    for p in m.parameters():
        p.data = p.data.to(dtype)
    return m.to("cuda")


def _op_by_op(m, tok, pos, kc, vc):
    """The same step through the one-op kernels (FusedLlama's path for other shapes)."""
    ops = torch.ops.babyrt
    x = ops.embedding(tok, m.tok_embeddings.weight, m.tok_embeddings.scales, m.norm.dtype)
    for i, layer in enumerate(m.layers):
        x = layer(x, pos, m.rope_cos, m.rope_sin, kc[i], vc[i])
    return ops.rmsnorm_linear(x, m.norm, m.eps, m.output.weight, m.output.scales, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ["float", "mha-untied", "int8", "int8-g32-bf16-float-classifier",
                                  "int8-g64-untied"])
def test_cuda_decode_step_matches_op_by_op(case, dtype, monkeypatch):
    """babyrt::decode_step (the whole step as one kernel, opt-in with BABYRT_DECODE_STEP=1)
    against the same step op by op: the logits and the KV cache it writes, over 40 steps that
    run past several ring refills."""
    monkeypatch.setenv("BABYRT_DECODE_STEP", "1")
    m = _step_model(case, dtype)
    L, KV, S, D = m.n_layers, m.n_kv_heads, m.context_length, m.head_dim
    kc = torch.zeros(L, 1, KV, S, D, device="cuda", dtype=dtype)
    vc = torch.zeros_like(kc)
    prompt = torch.randint(0, 320, (1, 7), device="cuda")
    m(prompt, torch.arange(7, device="cuda")[None], kc, vc)  # prefill: op by op (7 tokens)
    kr, vr = kc.clone(), vc.clone()
    tok = prompt[:, -1:]
    weights, scales = m.step_tensors()
    for p in range(7, 47):
        pos = torch.tensor([[p]], device="cuda")
        got = torch.ops.babyrt.decode_step(tok, pos, weights, scales, m.rope_cos, m.rope_sin, kc, vc,
                                           m.n_heads, m.n_kv_heads, m.eps)
        assert got.shape == (1, 1, 320), "the one-kernel step did not cover this model"
        want = _op_by_op(m, tok, pos, kr, vr)
        scale = want.abs().max().item()
        torch.testing.assert_close(got, want, atol=2e-2 * scale, rtol=2e-2)
        torch.testing.assert_close(kc, kr, atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(vc, vr, atol=2e-2, rtol=2e-2)
        tok = want.argmax(-1)
    # FusedLlama.forward takes the one-kernel step for such a call.
    pos = torch.tensor([[47]], device="cuda")
    k2, v2 = kc.clone(), vc.clone()
    direct = torch.ops.babyrt.decode_step(tok, pos, weights, scales, m.rope_cos, m.rope_sin, kc, vc,
                                          m.n_heads, m.n_kv_heads, m.eps)
    assert torch.equal(m(tok, pos, k2, v2), direct)


def test_cuda_decode_step_declines_what_it_does_not_cover(monkeypatch):
    """fp32 weights, or a weight on another device: an empty result, and FusedLlama runs the
    layers op by op. So does every model without BABYRT_DECODE_STEP=1."""
    monkeypatch.setenv("BABYRT_DECODE_STEP", "1")
    m = _step_model("float", torch.float32)
    weights, scales = m.step_tensors()
    kc = torch.zeros(m.n_layers, 1, m.n_kv_heads, m.context_length, m.head_dim, device="cuda")
    tok, pos = torch.tensor([[3]], device="cuda"), torch.tensor([[0]], device="cuda")
    out = torch.ops.babyrt.decode_step(tok, pos, weights, scales, m.rope_cos, m.rope_sin, kc,
                                       kc.clone(), m.n_heads, m.n_kv_heads, m.eps)
    assert out.numel() == 0
    assert m(tok, pos, kc, kc.clone()).shape == (1, 1, 320)
    m = _step_model("float", torch.bfloat16)
    weights, scales = m.step_tensors()
    kc = kc.to(torch.bfloat16)
    args = (tok, pos, weights, scales, m.rope_cos, m.rope_sin, kc, kc.clone(), m.n_heads,
            m.n_kv_heads, m.eps)
    assert torch.ops.babyrt.decode_step(*args).numel() > 0
    # A tensor on another device: declined, not read through a host pointer.
    elsewhere = (args[0], args[1], [weights[0].cpu()] + weights[1:]) + args[3:]
    assert torch.ops.babyrt.decode_step(*elsewhere).numel() == 0
    monkeypatch.setenv("BABYRT_DECODE_STEP", "0")
    assert torch.ops.babyrt.decode_step(*args).numel() == 0


def test_cuda_generation_with_and_without_the_one_kernel_step(trained_artifact):
    """Greedy bf16 generation through graphs of one-kernel steps equals the op-by-op steps' (a
    subprocess each: the flag is read once, and a fresh process captures its own graphs)."""
    code = ("import babyrt, sys; rt = babyrt.load(sys.argv[1], device='cuda', dtype='bf16'); "
            "print(repr(rt.generate('The ', max_new_tokens=48, temperature=0)))")
    runs = [subprocess.run([sys.executable, "-c", code, str(trained_artifact)], capture_output=True,
                           text=True, env={**os.environ, "BABYRT_DECODE_STEP": value}, timeout=300)
            for value in ("1", "0")]
    assert all(r.returncode == 0 for r in runs), [r.stderr[-2000:] for r in runs]
    assert runs[0].stdout == runs[1].stdout and len(runs[0].stdout) > 10
