"""Hardening: concurrent use, text that cannot cross into C++, and loading that runs no
pickled Python."""
import pickle
import threading

import pytest
import torch

import babyrt
from babyrt.training.trainer import load_checkpoint, train


def test_eight_threads_match_their_seeds_alone(gqa_model):
    rt = babyrt.load(gqa_model[1])
    kw = dict(max_new_tokens=40, temperature=1.0, top_k=30, top_p=0.9)
    alone = [rt.generate("Return", seed=s, **kw) for s in range(8)]
    got = [None] * 8
    barrier = threading.Barrier(8)

    def work(s):
        barrier.wait()
        got[s] = "".join(rt.stream("Return", seed=s, **kw)) if s % 2 else rt.generate("Return", seed=s, **kw)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
        assert not t.is_alive(), "deadlock"
    assert got == alone


def test_text_that_is_not_utf8_is_an_argument_error(gqa_model):
    rt = babyrt.load(gqa_model[1])
    with pytest.raises(babyrt.ArgumentError, match="UTF-8"):
        rt.generate("Return \udc80", max_new_tokens=2)
    with pytest.raises(babyrt.ArgumentError, match="UTF-8"):
        rt.encode("\ud800")
    with pytest.raises(babyrt.ArgumentError, match="UTF-8"):
        rt.generate("Return", max_new_tokens=2, stop=["\udc80"])


def test_same_seed_is_deterministic_across_many_runs(gqa_model):
    rt = babyrt.load(gqa_model[1])
    runs = {rt.generate("Return", max_new_tokens=30, seed=123, temperature=1.2) for _ in range(20)}
    assert len(runs) == 1


class Payload:
    def __reduce__(self):
        import os
        return (os.system, ("touch /tmp/babyrt_pwned",))


def test_checkpoints_load_with_weights_only(tmp_path, corpus_file):
    import os
    train(corpus_file, tmp_path / "c", "llama2", preset="tiny", progress=False,
          train_overrides={"max_steps": 2})
    if os.path.exists("/tmp/babyrt_pwned"):
        os.remove("/tmp/babyrt_pwned")
    with open(tmp_path / "c" / "checkpoint.pt", "wb") as f:
        pickle.dump({"model": Payload()}, f)
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(tmp_path / "c")
    assert not os.path.exists("/tmp/babyrt_pwned")


def huge_cache_artifact(tmp_path, gqa_model):
    """A valid artifact whose metadata asks for a KV cache of hundreds of GB."""
    from babyrt.artifact import read_metadata, write_artifact
    model, art, _ = gqa_model
    md = {**read_metadata(art), "n_layers": 8, "n_kv_heads": 4096, "head_dim": 65536}
    return write_artifact(tmp_path / "huge", torch.jit.load(str(art / "model.pt")), md,
                          art / "tokenizer.bin")


def test_cache_larger_than_memory_is_a_device_error(tmp_path, gqa_model):
    rt = babyrt.load(huge_cache_artifact(tmp_path, gqa_model))
    with pytest.raises(babyrt.DeviceError, match="KV cache needs"):
        rt.generate("Return", max_new_tokens=2)
    assert babyrt.load(gqa_model[1]).generate("Return", max_new_tokens=3, seed=0)
