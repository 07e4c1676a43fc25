"""Every model of the family exports, matches its Python eager self in the C++ runtime, and
generates through babyrt.load and babyrt-run."""

import pytest
import torch

import babyrt
from babyrt.training.models import (BabyGPT, Bigram, GPTConfig, Llama, Llama1, Llama1Config,
                                    LlamaConfig, NGram, NGramConfig, BigramConfig)
from conftest import export_char_model, run_cli
from test_generate import reference_greedy

TOL = 1e-4

FAMILY = {
    "bigram": lambda v: Bigram(BigramConfig(vocab_size=v)),
    "ngram": lambda v: NGram(NGramConfig(vocab_size=v, n=4, emb_dim=12, hidden_dim=40)),
    "babygpt": lambda v: BabyGPT(GPTConfig(vocab_size=v, dim=48, n_layers=2, n_heads=4,
                                           context_length=24, dropout=0.0)),
    "babygpt-tied-nobias": lambda v: BabyGPT(GPTConfig(vocab_size=v, dim=32, n_layers=2,
                                                       n_heads=2, context_length=16, dropout=0.0,
                                                       bias=False, tie_embeddings=True)),
    "llama1": lambda v: Llama1(Llama1Config(vocab_size=v, dim=48, n_layers=2, n_heads=3,
                                            context_length=24, multiple_of=16)),
    "llama2-tied": lambda v: Llama(LlamaConfig(vocab_size=v, dim=64, n_layers=2, n_heads=4,
                                               n_kv_heads=1, context_length=24, multiple_of=32,
                                               tie_embeddings=True)),
}


def _random_bigram(v):
    model = Bigram(BigramConfig(vocab_size=v))
    torch.nn.init.normal_(model.table.weight)  # a zero table would make every test trivially pass
    return model


@pytest.fixture(scope="module", params=sorted(FAMILY))
def member(request, tmp_path_factory, corpus_text):
    build = _random_bigram if request.param == "bigram" else FAMILY[request.param]
    model, art, tok = export_char_model(tmp_path_factory.mktemp(request.param), corpus_text,
                                        build, seed=3)
    return request.param, model, art, tok


def test_logits_parity(member, corpus_text):
    name, model, art, tok = member
    rt = babyrt.load(art)
    ids = tok.encode(corpus_text[200:200 + rt.context_length + (5 if rt.metadata["cache_kind"] == "window" else 0)])
    with torch.no_grad():
        ref = model(torch.tensor([ids]))[0]
    for prefill in (None, 1, 3):
        diff = (rt.logits(ids, prefill=prefill) - ref).abs().max().item()
        assert diff <= TOL, f"{name} prefill={prefill}: {diff}"


def test_greedy_generation_equals_reference_past_the_context(member):
    name, model, art, tok = member
    rt = babyrt.load(art)
    n = rt.context_length + 10
    text = rt.generate("Return", max_new_tokens=n, temperature=0)
    assert text == tok.decode(reference_greedy(model, tok.encode("Return"), n)[6:])
    r = run_cli("babyrt-run", art, "-p", "Return", "-n", str(n), "-t", "0")
    assert r.returncode == 0 and r.stdout == text + "\n", r.stderr


def test_llama1_has_no_gqa():
    with pytest.raises(ValueError, match="n_kv_heads"):
        Llama1Config(n_heads=4, n_kv_heads=2, dim=32)


def test_llama2_multiple_of_sizing():
    assert LlamaConfig(dim=256, n_heads=4, multiple_of=256).hidden_dim == 768
    assert LlamaConfig(dim=288, multiple_of=32).hidden_dim == 768
