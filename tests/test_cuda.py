"""CUDA path of the runtime. Runs on the GPU machine (tools/gpu_check.sh); skips elsewhere."""
import pytest
import torch

import babyrt

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
