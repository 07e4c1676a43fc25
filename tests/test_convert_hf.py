"""transformers LlamaForCausalLM folders in and out of babyrt: same logits (fp32, <= 1e-4) and
the same greedy tokens, for an MHA and a GQA config."""
import json

import pytest
import torch

import babyrt
from babyrt import convert
from babyrt.training.tokenizers import CharTokenizer
from conftest import run_cli

transformers = pytest.importorskip("transformers")

CONFIGS = {"mha": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False),
           "gqa": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def hf_folder(request, tmp_path_factory, corpus_text):
    tmp = tmp_path_factory.mktemp("hf-" + request.param)
    tok = CharTokenizer.train(corpus_text)
    tok.save(tmp)  # tokenizer.bin whose vocab matches the model's
    cfg = transformers.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64,
                                   intermediate_size=160, num_hidden_layers=2,
                                   max_position_embeddings=64, rms_norm_eps=1e-5,
                                   rope_theta=10000.0, **CONFIGS[request.param])
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(tmp / "hf")
    return model, tmp / "hf", tmp / "tokenizer.bin"


def greedy_with_runtime(rt, ids, n):
    ids = list(ids)
    for _ in range(n):
        ids.append(int(rt.logits(ids)[-1].argmax()))
    return ids


def test_hf_to_babyrt_matches_transformers(tmp_path, hf_folder):
    model, folder, tok_bin = hf_folder
    r = run_cli("babyrt", "convert", "--from", "hf", folder, "--tokenizer", tok_bin, "--out",
                tmp_path / "art")
    assert r.returncode == 0, r.stderr
    rt = babyrt.load(tmp_path / "art")
    ids = [3, 17, 42, 5, 9, 30, 11, 2, 8]
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0]
    assert (rt.logits(ids) - ref).abs().max() <= 1e-4
    assert (rt.logits(ids, prefill=1) - ref).abs().max() <= 1e-4
    with torch.no_grad():
        hf_ids = model.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False,
                                min_new_tokens=20)[0].tolist()
    assert greedy_with_runtime(rt, ids, 20) == hf_ids


def test_babyrt_to_hf_loads_in_transformers(tmp_path, hf_folder):
    model, folder, tok_bin = hf_folder
    convert.hf_to_artifact(folder, tmp_path / "art", tokenizer_bin=tok_bin)
    r = run_cli("babyrt", "convert", "--to", "hf", tmp_path / "art", "--out", tmp_path / "hf2")
    assert r.returncode == 0, r.stderr
    again = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf2").eval()
    ids = torch.tensor([[1, 4, 9, 16, 25]])
    with torch.no_grad():
        assert (again(ids).logits - model(ids).logits).abs().max() <= 1e-5


@pytest.mark.parametrize("damage,message", [
    ("no_config", "no config.json"),
    ("bad_json", "not valid JSON"),
    ("wrong_type", "model_type must be 'llama'"),
    ("missing_field", "bad or missing field"),
    ("truncated_weights", "not a readable safetensors"),
    ("wrong_shape", "do not match config.json"),
])
def test_bad_hf_folders(tmp_path, hf_folder, damage, message):
    _, folder, tok_bin = hf_folder
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in folder.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((bad / "config.json").read_text())
    if damage == "no_config":
        (bad / "config.json").unlink()
    elif damage == "bad_json":
        (bad / "config.json").write_text("{not json")
    elif damage == "wrong_type":
        (bad / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    elif damage == "missing_field":
        del cfg["hidden_size"]
        (bad / "config.json").write_text(json.dumps(cfg))
    elif damage == "truncated_weights":
        w = bad / "model.safetensors"
        w.write_bytes(w.read_bytes()[:1000])
    elif damage == "wrong_shape":
        (bad / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 96}))
    with pytest.raises(convert.ConversionError, match=message):
        convert.hf_to_artifact(bad, tmp_path / "out", tokenizer_bin=tok_bin)
    assert not (tmp_path / "out").exists()
