import threading

import pytest
import torch

import babyrt


def reference_greedy(model, ids, n):
    """Python eager greedy decoding, conditioning on at most context_length tokens (nanoGPT's crop)."""
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            ctx = ids[-model.cfg.context_length:]
            ids.append(int(model(torch.tensor([ctx]))[0, -1].argmax()))
    return ids


def test_greedy_equals_python_reference(gqa_model):
    model, art, tok = gqa_model
    rt = babyrt.load(art)
    prompt = "Return the"
    text = rt.generate(prompt, max_new_tokens=30, temperature=0)
    expected = reference_greedy(model, tok.encode(prompt), 30)
    assert text == tok.decode(expected[len(tok.encode(prompt)):])
    assert rt.last_stats["generated_tokens"] == 30 and rt.last_stats["finish_reason"] == "length"


def test_generation_slides_past_the_context(gqa_model):
    model, art, tok = gqa_model
    rt = babyrt.load(art)
    n = model.cfg.context_length + 20
    text = rt.generate("The", max_new_tokens=n, temperature=0)
    assert text == tok.decode(reference_greedy(model, tok.encode("The"), n)[3:])


def test_temperature_zero_ignores_seed(gqa_model):
    rt = babyrt.load(gqa_model[1])
    a = rt.generate("Return", max_new_tokens=20, temperature=0, seed=1)
    b = rt.generate("Return", max_new_tokens=20, temperature=0, seed=2)
    assert a == b


def test_same_seed_same_text(gqa_model):
    rt = babyrt.load(gqa_model[1])
    kw = dict(max_new_tokens=40, temperature=1.0, top_k=20, top_p=0.9)
    a = rt.generate("Return", seed=7, **kw)
    assert a == rt.generate("Return", seed=7, **kw)
    assert a == babyrt.load(gqa_model[1]).generate("Return", seed=7, **kw)
    assert len({rt.generate("Return", seed=s, **kw) for s in range(5)}) > 1


def test_top_k_one_is_greedy(gqa_model):
    rt = babyrt.load(gqa_model[1])
    greedy = rt.generate("Return", max_new_tokens=25, temperature=0)
    assert rt.generate("Return", max_new_tokens=25, temperature=1.5, top_k=1, seed=3) == greedy


def test_stream_pieces_join_to_generate(gqa_model):
    rt = babyrt.load(gqa_model[1])
    kw = dict(max_new_tokens=40, temperature=0.9, seed=11)
    pieces = list(rt.stream("Return the", **kw))
    assert len(pieces) > 1 and all(pieces)
    assert "".join(pieces) == rt.generate("Return the", **kw)


def test_stop_string_ends_generation_before_it(gqa_model):
    rt = babyrt.load(gqa_model[1])
    full = rt.generate("Return", max_new_tokens=60, temperature=0)
    stop = full[10:12]
    assert stop and stop in full
    cut = rt.generate("Return", max_new_tokens=60, temperature=0, stop=[stop, "\x00never"])
    assert cut == full[:full.index(stop)]
    assert rt.last_stats["finish_reason"] == "stop"
    assert "".join(rt.stream("Return", max_new_tokens=60, temperature=0, stop=stop)) == cut


def test_encode_decode(gqa_model):
    rt = babyrt.load(gqa_model[1])
    _, _, tok = gqa_model
    assert rt.encode("Return the") == tok.encode("Return the")
    assert rt.decode(rt.encode("Return the")) == "Return the"


@pytest.mark.parametrize("kwargs,message", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=10**12), "max_new_tokens"),
    (dict(max_new_tokens=10**30), "max_new_tokens"),
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=-1), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(seed=-1), "seed"),
    (dict(stop=[""]), "stop"),
    (dict(stop=[3]), "stop"),
    (dict(stop=3), "stop"),
])
def test_bad_sampling_values(gqa_model, kwargs, message):
    rt = babyrt.load(gqa_model[1])
    with pytest.raises(babyrt.ArgumentError, match=message):
        rt.generate("Return", **kwargs)
    with pytest.raises(ValueError):  # ArgumentError is a ValueError too
        list(rt.stream("Return", **kwargs))


def test_bad_prompts(gqa_model):
    model, art, _ = gqa_model
    rt = babyrt.load(art)
    with pytest.raises(babyrt.ArgumentError, match="context holds 48"):
        rt.generate("x" * 49, max_new_tokens=1)
    with pytest.raises(babyrt.ArgumentError, match="empty"):
        rt.generate("", max_new_tokens=1)
    with pytest.raises(babyrt.TokenizerError, match="not in the char-level vocabulary"):
        rt.generate("Return \u2603", max_new_tokens=1)
    with pytest.raises(babyrt.ArgumentError):
        rt.generate(b"bytes", max_new_tokens=1)
    with pytest.raises(babyrt.ArgumentError, match="outside the vocabulary"):
        rt.logits([0, 10**6])


def test_no_cuda_is_a_clear_error(gqa_model):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(babyrt.DeviceError, match="no CUDA GPU"):
        babyrt.load(gqa_model[1], device="cuda")
    with pytest.raises(babyrt.ArgumentError, match="device"):
        babyrt.load(gqa_model[1], device="tpu")


def test_threads_share_one_model(gqa_model):
    rt = babyrt.load(gqa_model[1])
    kw = dict(max_new_tokens=30, temperature=1.0, top_p=0.9)
    expected = {s: rt.generate("Return", seed=s, **kw) for s in range(6)}
    got = {}

    def work(s):
        got[s] = rt.generate("Return", seed=s, **kw)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert got == expected


def test_one_shot_generate(gqa_model):
    text = babyrt.generate(gqa_model[1], "Return", max_new_tokens=10, temperature=0)
    assert text == babyrt.load(gqa_model[1]).generate("Return", max_new_tokens=10, temperature=0)
