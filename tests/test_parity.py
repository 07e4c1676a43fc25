"""The C++ runtime's logits equal the Python eager model's (fp32, <= 1e-4), for prefill and for
every decode step through the KV cache; cached decoding equals full recomputation."""
import pytest
import torch

import babyrt

TOL = 1e-4


@pytest.mark.parametrize("which", ["gqa_model", "mha_model"])
def test_logits_parity_prefill_and_every_decode_step(which, request, corpus_text):
    model, art, tok = request.getfixturevalue(which)
    rt = babyrt.load(art)
    ids = tok.encode(corpus_text[100:100 + model.cfg.context_length])
    assert len(ids) == model.cfg.context_length  # fill the whole cache
    with torch.no_grad():
        ref = model(torch.tensor([ids]))[0]  # full recomputation, no cache
    for prefill in (None, 1, 7, len(ids) - 1):
        got = rt.logits(ids, prefill=prefill)
        assert got.shape == ref.shape
        diff = (got - ref).abs().max().item()
        assert diff <= TOL, f"prefill={prefill}: max abs diff {diff}"


def test_python_cache_path_equals_recomputation(gqa_model, corpus_text):
    """The eager model's own cached path (what the exported module runs) matches no-cache."""
    model, _, tok = gqa_model
    cfg = model.cfg
    ids = torch.tensor([tok.encode(corpus_text[:20])])
    k = torch.zeros(cfg.n_layers, 1, cfg.n_kv_heads, cfg.context_length, cfg.head_dim)
    v = torch.zeros_like(k)
    with torch.no_grad():
        ref = model(ids)[0]
        first = model(ids[:, :12], torch.arange(12)[None], k, v)[0]
        steps = [model(ids[:, i:i + 1], torch.tensor([[i]]), k, v)[0] for i in range(12, 20)]
    got = torch.cat([first, *steps])
    assert (got - ref).abs().max() <= 1e-5


def test_batched_forward_with_different_positions(gqa_model, corpus_text):
    """Two sequences in one batch at different positions behave as two separate runs."""
    model, art, tok = gqa_model
    cfg = model.cfg
    a, b = tok.encode(corpus_text[:10]), tok.encode(corpus_text[50:56])
    k = torch.zeros(cfg.n_layers, 2, cfg.n_kv_heads, cfg.context_length, cfg.head_dim)
    v = torch.zeros_like(k)
    scripted = torch.jit.load(str(art / "model.pt"))
    with torch.no_grad():
        scripted(torch.tensor([a[:6], b]), torch.arange(6).expand(2, 6), k, v)
        step = scripted(torch.tensor([[a[6]], [b[0]]]), torch.tensor([[6], [6]]), k, v)[:, 0]
        ref_a = model(torch.tensor([a[:7]]))[0, -1]
        ref_b = model(torch.tensor([b + [b[0]]]))[0, -1]
    assert (step[0] - ref_a).abs().max() <= TOL
    assert (step[1] - ref_b).abs().max() <= TOL
