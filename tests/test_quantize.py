"""int8 artifacts: what export writes (scheme, size), and that the C++ runtime runs them as the
Python reference does (same ops, same greedy tokens), close to the float model."""
import json
import zipfile

import pytest
import torch

import babyrt
from babyrt.artifact import read_metadata
from babyrt.export import export_model, inference_model
from babyrt.quantize import QuantConfig
from babyrt.training.models import MODELS
from conftest import GQA, export_char_model, run_cli


def greedy(model, ids, n):
    """Greedy decoding by full recomputation: the Python reference for the runtime's tokens."""
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids


@pytest.fixture(scope="module")
def int8_llama(tmp_path_factory, corpus_text):
    from babyrt.training.models import Llama, LlamaConfig

    tmp = tmp_path_factory.mktemp("q8")
    cfg = {**GQA, "multiple_of": 32, "tie_embeddings": True}  # hidden 192: groups of 32 divide it
    model, fp32_art, tok = export_char_model(tmp / "fp32", corpus_text,
                                             lambda v: Llama(LlamaConfig(vocab_size=v, **cfg)))
    quant = QuantConfig(group_size=32)
    info = {**tok.save(tmp), "bos_id": -1, "eos_id": -1, "add_bos": False}
    art = export_model(model, info, tmp / "tokenizer.bin", tmp / "int8", quant=quant)
    return model, fp32_art, art, tok, inference_model(model, quant=quant)


def test_metadata_records_the_scheme(int8_llama):
    md = read_metadata(int8_llama[2])
    assert md["quantization"] == "int8"
    assert md["quantization_config"] == {"scheme": "symmetric", "bits": 8, "group_size": 32,
                                         "scale_dtype": "fp32", "classifier": True,
                                         "embedding": False}


def test_linear_weights_take_a_quarter_plus_scales(int8_llama):
    model, fp32_art, art, _, _ = int8_llama
    module = torch.jit.load(str(art / "model.pt"))
    sd = module.state_dict()
    q8, seen = {}, set()
    for k, v in sd.items():  # the tied table appears under both names
        if v.dtype == torch.int8 and v.data_ptr() not in seen:
            q8[k], _ = v, seen.add(v.data_ptr())
    # every matrix (the tied embedding/classifier once) is int8
    n_linear = sum(p.numel() for p in model.parameters() if p.dim() == 2)
    assert sum(v.numel() for v in q8.values()) == n_linear
    scales = [sd[k.replace("weight", "scales")] for k in q8]
    assert all(s.dtype == torch.float32 and s.shape[1] * 32 == w.shape[1]
               for s, w in zip(scales, q8.values()))
    # the model file shrinks accordingly (zip entries are stored uncompressed)
    sizes = {a: sum(i.file_size for i in zipfile.ZipFile(a / "model.pt").infolist())
             for a in (fp32_art, art)}
    want = sizes[fp32_art] - n_linear * 4 + n_linear + sum(s.numel() * 4 for s in scales)
    assert abs(sizes[art] - want) < 0.02 * sizes[fp32_art]


def test_runtime_matches_python_int8_reference(int8_llama, corpus_text):
    model, _, art, tok, ref = int8_llama
    rt = babyrt.load(art)
    ids = tok.encode(corpus_text[:model.cfg.context_length])
    with torch.no_grad():
        want = ref(torch.tensor([ids]))[0]
        fp32 = model(torch.tensor([ids]))[0]
    for prefill in (None, 5):
        assert (rt.logits(ids, prefill=prefill) - want).abs().max() <= 1e-4
    # int8 stays close to the float model (random weights: a loose bound)
    assert (want - fp32).abs().max() < 0.05 * fp32.abs().max()
    prompt = tok.encode(corpus_text[:10])
    out = rt.generate(corpus_text[:10], max_new_tokens=20, temperature=0)
    assert tok.encode(corpus_text[:10] + out) == greedy(ref, prompt, 20)


def test_bf16_load_keeps_int8_weights(int8_llama, corpus_text):
    _, _, art, tok, _ = int8_llama
    rt = babyrt.load(art, dtype="bf16")
    assert rt.dtype == "bf16"
    got = rt.logits(tok.encode(corpus_text[:16]))
    want = babyrt.load(art).logits(tok.encode(corpus_text[:16]))
    assert (got - want).abs().max() < 0.1 * want.abs().max()


@pytest.mark.parametrize("name", ["babygpt", "ngram"])
def test_other_models_quantize_their_linears(tmp_path, corpus_text, name):
    cfg = {"babygpt": dict(dim=32, n_layers=2, n_heads=4, context_length=32),
           "ngram": dict(n=3, emb_dim=16, hidden_dim=32)}[name]
    cls, cfg_cls = MODELS[name]
    model, _, tok = export_char_model(tmp_path / "fp", corpus_text, lambda v: cls(cfg_cls(vocab_size=v, **cfg)))
    quant = QuantConfig()
    info = {**tok.save(tmp_path), "bos_id": -1, "eos_id": -1, "add_bos": False}
    art = export_model(model, info, tmp_path / "tokenizer.bin", tmp_path / "q8", quant=quant)
    ref = inference_model(model, quant=quant)
    assert any(isinstance(m, torch.nn.Module) and type(m).__name__ == "QuantizedLinear"
               for m in ref.modules())
    ids = tok.encode(corpus_text[:20])
    with torch.no_grad():
        want = ref(torch.tensor([ids]))[0]
    assert (babyrt.load(art).logits(ids) - want).abs().max() <= 1e-4


def test_cli_export_int8(tmp_path, corpus_file):
    ck = tmp_path / "ck"
    run_cli("babyrt", "train", "--model", "llama2", "--preset", "tiny", "--data", corpus_file,
            "--out", ck, "--max-steps", "2", check=True)
    r = run_cli("babyrt", "export", ck, "--out", tmp_path / "a", "--quantize", "int8",
                "--group-size", "32", check=True)
    assert "bytes" in r.stdout
    md = read_metadata(tmp_path / "a")
    assert md["quantization"] == "int8" and md["quantization_config"]["group_size"] == 32
    bad = run_cli("babyrt", "export", ck, "--out", tmp_path / "b", "--quantize", "int8",
                  "--group-size", "48")
    assert bad.returncode != 0 and "group-size" in bad.stderr


def test_bench_reports_both_variants_and_its_peers(tmp_path):
    out = tmp_path / "bench.json"
    r = run_cli("babyrt", "bench", "--shape", "stories15M", "--quantize", "int8", "--new-tokens", "8",
                "--repeat", "1", "--peers", "cli,eager,hf", "--json", out, "--plot", tmp_path / "bench.png",
                "--cache-dir", tmp_path / "cache")
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(list((tmp_path / "cache").iterdir())) == 2  # kept for later runs
    res = json.loads(out.read_text())
    rows = {(x["runtime"], x["quantization"]): x for x in res["rows"]}
    assert set(rows) == {("babyrt", "none"), ("babyrt", "int8"), ("PyTorch eager loop", "none"),
                         ("HF transformers generate", "none"), ("babyrt-run (C++ CLI)", "none"),
                         ("babyrt-run (C++ CLI)", "int8")}
    assert rows[("babyrt-run (C++ CLI)", "int8")]["tg_tok_s"] > 0
    fp32, q8 = rows[("babyrt", "none")], rows[("babyrt", "int8")]
    assert q8["weight_bytes"] < fp32["weight_bytes"] / 3  # int8 reads about a quarter
    assert fp32["tg_tok_s"] > 0 and fp32["new_tokens"] == 8 and res["copy_gb_s"] > 0
    assert "| babyrt |" in r.stdout and (tmp_path / "bench.png").stat().st_size > 1000
    bad = run_cli("babyrt", "bench")
    assert bad.returncode == 1 and "--shape" in bad.stderr
    bad = run_cli("babyrt", "bench", "--shape", "stories15M", "--peers", "llamacpp")
    assert bad.returncode == 1 and "unknown peers" in bad.stderr


def test_bench_cache_dir_reuses_its_artifacts(tmp_path, monkeypatch):
    """--cache-dir: --shape's artifacts are exported once and found again by later runs; another
    context is another artifact; bench runs on what it finds."""
    from babyrt import bench

    quants = [None, QuantConfig()]
    first = bench.shape_artifacts("stories15M", 64, "fp32", quants, tmp_path)
    assert [name for name, _ in first] == ["stories15M fp32", "stories15M fp32 int8"]
    assert [read_metadata(p)["quantization"] for _, p in first] == ["none", "int8"]
    with monkeypatch.context() as m:
        m.setattr(bench, "shape_model", lambda *a: pytest.fail("exported again"))
        assert bench.shape_artifacts("stories15M", 64, "fp32", quants, tmp_path) == first
    [(_, other)] = bench.shape_artifacts("stories15M", 128, "fp32", [None], tmp_path)
    assert other not in [p for _, p in first] and len(list(tmp_path.iterdir())) == 3
    res = bench.bench(shape="stories15M", new_tokens=4, repeat=1, peers=(), cache_dir=tmp_path)
    assert [r["tg_tok_s"] > 0 for r in res["rows"]] == [True]
    assert len(list(tmp_path.iterdir())) == 4  # its context (512) kept for the next run
