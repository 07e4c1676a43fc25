"""Batched generation: several prompts of different lengths decoded together (one cache row
each), each stopping on its own. Greedy, every text equals a single run of its prompt."""
import os
import subprocess
import sys

import pytest

import babyrt

PROMPTS = ["Return the", "A", "The value of x is", "If the", "Create a new", "This module",
           "Raise", "Return a list of all the"]


@pytest.mark.parametrize("fixture", ["gqa_model", "mha_model"])
def test_batch_equals_single_runs(request, fixture):
    rt = babyrt.load(request.getfixturevalue(fixture)[1])
    singles = [rt.generate(p, max_new_tokens=14, temperature=0) for p in PROMPTS]
    assert rt.generate_batch(PROMPTS, max_new_tokens=14, temperature=0) == singles
    stats = rt.last_stats
    assert [s["prompt_tokens"] for s in stats] == [len(rt.encode(p)) for p in PROMPTS]
    assert all(s["generated_tokens"] == 14 and s["finish_reason"] == "length" for s in stats)


def test_batch_sequences_stop_on_their_own(gqa_model):
    rt = babyrt.load(gqa_model[1])
    singles = [rt.generate(p, max_new_tokens=30, temperature=0) for p in PROMPTS[:4]]
    stop = singles[1][5:8]  # ends one sequence early; the others may or may not meet it
    want = [rt.generate(p, max_new_tokens=30, temperature=0, stop=stop) for p in PROMPTS[:4]]
    assert rt.generate_batch(PROMPTS[:4], max_new_tokens=30, temperature=0, stop=stop) == want
    assert rt.last_stats[1]["finish_reason"] == "stop"
    assert len(want[1]) == 5


def test_batch_runs_to_the_end_of_the_context(gqa_model):
    """A sequence that fills the context ends there ("length"); the others go on."""
    rt = babyrt.load(gqa_model[1])
    ctx = rt.context_length
    long_prompt = "x" * (ctx - 3)
    texts = rt.generate_batch([long_prompt, "A"], max_new_tokens=10, temperature=0)
    assert len(texts[0]) == 4  # the prefill's token and 3 decode steps fill the context
    assert rt.last_stats[0]["finish_reason"] == "length"
    assert texts[1] == rt.generate("A", max_new_tokens=10, temperature=0)


def test_batch_sampling_is_seeded_and_respects_top_k(gqa_model):
    rt = babyrt.load(gqa_model[1])
    kw = dict(max_new_tokens=16, temperature=1.0, top_p=0.9, seed=3)
    a = rt.generate_batch(PROMPTS[:3], **kw)
    assert a == rt.generate_batch(PROMPTS[:3], **kw)
    assert a != rt.generate_batch(PROMPTS[:3], **{**kw, "seed": 4})
    # top_k 1 leaves one candidate: sampling is greedy whatever the temperature
    greedy = rt.generate_batch(PROMPTS[:3], max_new_tokens=16, temperature=0)
    assert rt.generate_batch(PROMPTS[:3], max_new_tokens=16, temperature=1.5, top_k=1, seed=9) == greedy
    assert rt.generate_batch(PROMPTS[:3], max_new_tokens=16, temperature=1.0, top_p=1e-6, seed=9) == greedy


def test_batch_of_a_window_model(tmp_path, corpus_text):
    from conftest import export_char_model
    from babyrt.training.models.ngram import NGram, NGramConfig
    _, art, _ = export_char_model(tmp_path, corpus_text,
                                  lambda v: NGram(NGramConfig(vocab_size=v, n=4, emb_dim=8, hidden_dim=16)))
    rt = babyrt.load(art)
    singles = [rt.generate(p, max_new_tokens=12, temperature=0) for p in PROMPTS[:3]]
    assert rt.generate_batch(PROMPTS[:3], max_new_tokens=12, temperature=0) == singles


def test_batch_rejects_bad_input(gqa_model):
    rt = babyrt.load(gqa_model[1])
    with pytest.raises(babyrt.ArgumentError, match="at least one prompt"):
        rt.generate_batch([], max_new_tokens=4)
    with pytest.raises(babyrt.ArgumentError, match="list of str"):
        rt.generate_batch("one string", max_new_tokens=4)
    with pytest.raises(babyrt.ArgumentError, match="prompt 1 is"):
        rt.generate_batch(["ok", "y" * 500], max_new_tokens=4)
    with pytest.raises(babyrt.ArgumentError, match="max_new_tokens"):
        rt.generate_batch(["ok"], max_new_tokens=0)


@pytest.mark.skipif(os.environ.get("BABYRT_DEVICE_LOOP") == "1", reason="already running it")
def test_the_on_device_decode_loop_on_the_cpu():
    """CUDA decodes through the DeviceLoop (tokens and sampling on the device); forcing that
    loop on the CPU runs the generation tests through it here too."""
    here = os.path.dirname(__file__)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                        os.path.join(here, "test_generate.py"), __file__],
                       env={**os.environ, "BABYRT_DEVICE_LOOP": "1"}, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:]
