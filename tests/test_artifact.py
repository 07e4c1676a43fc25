import json
import zipfile
from pathlib import Path

import pytest
import torch

import babyrt
from babyrt import artifact


def valid_metadata():
    return {"format_version": 1, "architecture": "llama", "vocab_size": 10, "context_length": 8,
            "n_layers": 1, "n_kv_heads": 1, "head_dim": 4, "dtype": "fp32", "quantization": "none",
            "bos_id": -1, "eos_id": -1, "add_bos": False, "tokenizer_kind": "char",
            "cache_kind": "kv"}


def test_cpp_embeds_the_same_format_definition():
    assert json.loads(babyrt._C.artifact_format()) == artifact.FORMAT


def test_every_defined_field_is_required_and_checked():
    md = valid_metadata()
    assert set(md) == set(artifact.FORMAT["fields"])
    babyrt._C.validate_metadata(json.dumps(md))
    for name in md:
        broken = dict(md)
        del broken[name]
        with pytest.raises(babyrt.ArtifactError, match=f"lacks field '{name}'"):
            babyrt._C.validate_metadata(json.dumps(broken))


@pytest.mark.parametrize("field,value,message", [
    ("vocab_size", "10", "must be an integer"),
    ("vocab_size", 0, r"must be in \[1,"),
    ("dtype", "fp64", "must be one of"),
    ("add_bos", 1, "must be a boolean"),
    ("cache_kind", None, "must be a string"),
    ("bos_id", 10, "below vocab_size"),
    ("format_version", 2, "format version 2 is not supported"),
    ("n_layers", 0, "needs n_layers"),
])
def test_bad_field_values_are_rejected(field, value, message):
    md = {**valid_metadata(), field: value}
    with pytest.raises(babyrt.ArtifactError, match=message):
        babyrt._C.validate_metadata(json.dumps(md))


@pytest.mark.parametrize("text", ["", "{", "[1, 2]", "null", '{"format_version": 1'])
def test_malformed_metadata_json(text):
    with pytest.raises(babyrt.ArtifactError):
        babyrt._C.validate_metadata(text)


def test_metadata_round_trip(gqa_model):
    model, art, _ = gqa_model
    md = artifact.read_metadata(art)
    assert md["n_kv_heads"] == 2 and md["head_dim"] == 16 and md["vocab_size"] == model.cfg.vocab_size
    assert babyrt.load(art).metadata == md


def test_writer_validates_before_writing(tmp_path, gqa_model):
    model, art, _ = gqa_model
    md = {**valid_metadata(), "dtype": "int4"}
    with pytest.raises(babyrt.ArtifactError):
        artifact.write_artifact(tmp_path / "out", torch.jit.script(model), md, art / "tokenizer.bin")
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []  # no temporary directory left behind


def copy_artifact(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_missing_artifact(tmp_path):
    with pytest.raises(babyrt.ArtifactError, match="not an artifact directory"):
        babyrt.load(tmp_path / "nope")
    with pytest.raises(babyrt.ArtifactError, match="model.pt: missing"):
        babyrt.load(tmp_path)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_model_file(tmp_path, gqa_model, damage):
    art = copy_artifact(gqa_model[1], tmp_path / "a")
    data = (art / "model.pt").read_bytes()
    new = {"garbage": b"\x00not a zip" * 1000, "truncated": data[: len(data) // 2], "empty": b""}
    (art / "model.pt").write_bytes(new[damage])
    with pytest.raises(babyrt.ArtifactError, match="model.pt"):
        babyrt.load(art)


def test_model_without_metadata_record(tmp_path, gqa_model):
    art = copy_artifact(gqa_model[1], tmp_path / "a")
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(art / "model.pt"))
    with pytest.raises(babyrt.ArtifactError, match="not a babyrt model"):
        babyrt.load(art)


def test_corrupt_metadata_record(tmp_path, gqa_model):
    art = copy_artifact(gqa_model[1], tmp_path / "a")
    src = zipfile.ZipFile(art / "model.pt")
    with zipfile.ZipFile(tmp_path / "m.pt", "w") as z:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename.endswith(artifact.METADATA_RECORD):
                data = data.replace(b'"dtype": "fp32"', b'"dtype": 32')
            z.writestr(item, data)
    (tmp_path / "m.pt").replace(art / "model.pt")
    with pytest.raises(babyrt.ArtifactError, match="'dtype' must be a string"):
        babyrt.load(art)


def test_tokenizer_that_does_not_match_the_model(tmp_path, gqa_model):
    art = copy_artifact(gqa_model[1], tmp_path / "a")
    data = (art / "tokenizer.bin").read_bytes()
    (art / "tokenizer.bin").write_bytes(data + b"\x00\x00\x00\x00\x01\x00\x00\x00x")
    with pytest.raises(babyrt.TokenizerError, match="does not match the model"):
        babyrt.load(art)
    (art / "tokenizer.bin").write_bytes(data[:-30])
    with pytest.raises(babyrt.TokenizerError, match="vocab_size"):
        babyrt.load(art)


def test_export_dtypes_and_load_conversion(tmp_path, gqa_model):
    from babyrt.export import export_model
    model, art, tok = gqa_model
    info = {"kind": "char", "bos_id": -1, "eos_id": -1, "add_bos": False}
    bf = export_model(model, info, art / "tokenizer.bin", tmp_path / "bf16", dtype="bf16")
    assert next(model.parameters()).dtype == torch.float32  # export leaves the model alone
    m = babyrt.load(bf)
    assert m.dtype == "bf16" and m.metadata["dtype"] == "bf16"
    ids = tok.encode("Return the value")
    ref = model(torch.tensor([ids]))[0]
    assert (m.logits(ids) - ref).abs().max() < 0.1
    m32 = babyrt.load(art, dtype="bf16")
    assert m32.dtype == "bf16"
    with pytest.raises(babyrt.ArgumentError, match="dtype"):
        babyrt.load(art, dtype="int3")
    assert (art.stat().st_mode & 0o777) != 0o700
