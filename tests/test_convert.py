"""llama2.c checkpoints (v0, v1 and v2/Q8_0) in and out of babyrt, and sentencepiece -> tokenizer.bin."""
import struct

import pytest
import torch

import babyrt
from babyrt import convert
from conftest import make_char_artifact, run_cli

CONFIGS = {
    "mha-untied": dict(dim=48, n_layers=2, n_heads=3, context_length=32, multiple_of=16),
    "gqa-tied": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, context_length=40,
                     multiple_of=32, tie_embeddings=True),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def llama_artifact(request, tmp_path_factory, corpus_text):
    return make_char_artifact(tmp_path_factory.mktemp(request.param), corpus_text,
                              CONFIGS[request.param], seed=5)


@pytest.mark.parametrize("version", [0, 1])
def test_llama2c_round_trip_is_exact(tmp_path, llama_artifact, version, corpus_text):
    model, art, tok = llama_artifact
    ckpt = convert.artifact_to_llama2c(art, tmp_path / "model.bin", version=version)
    cfg, state, _, got_version = convert.read_llama2c(ckpt)
    assert got_version == version and cfg.tie_embeddings == model.cfg.tie_embeddings
    for k, v in model.state_dict().items():
        assert torch.equal(state[k], v), k
    r = run_cli("babyrt", "convert", "--from", "llama2c", ckpt, "--tokenizer",
                art / "tokenizer.bin", "--out", tmp_path / "back")
    assert r.returncode == 0, r.stderr
    ids = tok.encode(corpus_text[:30])
    a, b = babyrt.load(art), babyrt.load(tmp_path / "back")
    assert torch.equal(a.logits(ids), b.logits(ids))
    assert b.metadata["add_bos"] is True  # llama2.c models start from BOS


def test_llama2c_v2_is_group_wise_int8(tmp_path, llama_artifact, corpus_text):
    model, art, tok = llama_artifact
    ckpt = convert.artifact_to_llama2c(art, tmp_path / "q.bin", version=2)
    cfg, state, quantized, version = convert.read_llama2c(ckpt)
    assert version == 2 and set(quantized) >= {"tok_embeddings.weight", "output.weight"}
    q, s = quantized["layers.0.attention.wq.weight"]
    group = q.shape[1] // s.shape[1]
    assert group == (64 if model.cfg.dim % 64 == 0 else 16)  # llama2.c's backoff from 64
    for name, w in model.state_dict().items():  # dequantized within half a step
        if name in quantized:
            step = quantized[name][1].repeat_interleave(group, 1)
            assert ((state[name] - w).abs() <= step / 2 + 1e-7).all(), name
    r = run_cli("babyrt", "convert", "--from", "llama2c", ckpt, "--tokenizer",
                art / "tokenizer.bin", "--out", tmp_path / "back")
    assert r.returncode == 0, r.stderr
    back = babyrt.load(tmp_path / "back")
    assert back.metadata["quantization"] == "int8"
    assert back.metadata["quantization_config"]["group_size"] == group
    ids = tok.encode(corpus_text[:30])
    fp32 = babyrt.load(art).logits(ids)
    assert (back.logits(ids) - fp32).abs().max() < 0.02 * fp32.abs().max()
    # the artifact holds the file's own int8 values: written out again, they are the same
    _, _, again, _ = convert.read_llama2c(
        convert.artifact_to_llama2c(tmp_path / "back", tmp_path / "q2.bin", version=2))
    for name, (q, s) in quantized.items():
        assert torch.equal(again[name][0], q), name
        torch.testing.assert_close(again[name][1], s, rtol=1e-6, atol=0)


def test_v0_header_marks_an_unshared_classifier(tmp_path, llama_artifact):
    model, art, _ = llama_artifact
    ckpt = convert.artifact_to_llama2c(art, tmp_path / "m.bin", version=0)
    vocab = struct.unpack_from("<7i", ckpt.read_bytes())[5]
    assert (vocab > 0) == model.cfg.tie_embeddings


@pytest.mark.parametrize("damage,message", [
    (lambda b: b[:-4], "but the file has"),
    (lambda b: b + b"\0" * 8, "but the file has"),
    (lambda b: b[:20], "too short"),
    (lambda b: b"\xff" * 2000, "implausible header"),
    (lambda b: struct.pack("<Ii", convert.MAGIC, 3) + b[8:], "version 3 is not supported"),
    (lambda b: struct.pack("<Ii", convert.MAGIC, 2) + b[8:], "group size 0 does not divide"),
])
def test_bad_llama2c_checkpoints(tmp_path, llama_artifact, damage, message):
    _, art, _ = llama_artifact
    good = convert.artifact_to_llama2c(art, tmp_path / "m.bin", version=1).read_bytes()
    (tmp_path / "bad.bin").write_bytes(damage(good))
    with pytest.raises(convert.ConversionError, match=message):
        convert.read_llama2c(tmp_path / "bad.bin")
    r = run_cli("babyrt", "convert", "--from", "llama2c", tmp_path / "bad.bin", "--tokenizer",
                art / "tokenizer.bin", "--out", tmp_path / "o")
    assert r.returncode == 1 and "babyrt: error:" in r.stderr
    assert not (tmp_path / "o").exists()


def test_sentencepiece_to_tokenizer_bin(tmp_path, shared_data):
    d = shared_data / "llama2_tokenizer"
    r = run_cli("babyrt", "convert", "--from", "sentencepiece", d / "tokenizer.model", "--out",
                tmp_path / "tokenizer.bin")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "tokenizer.bin").read_bytes() == (d / "tokenizer.bin").read_bytes()
    r = run_cli("babyrt", "convert", "--from", "sentencepiece", d / "tokenizer.bin", "--out",
                tmp_path / "x.bin")
    assert r.returncode == 1 and "not a sentencepiece model" in r.stderr


def test_llama2c_v2_bad_group_size_writes_nothing(tmp_path, llama_artifact):
    _, art, _ = llama_artifact
    r = run_cli("babyrt", "convert", "--to", "llama2c", art, "--out", tmp_path / "q.bin",
                "--version", "2", "--group-size", "0")
    assert r.returncode == 1 and "group_size must be a positive int" in r.stderr
    assert list(tmp_path.iterdir()) == []
