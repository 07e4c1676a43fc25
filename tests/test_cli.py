import json

import pytest

import babyrt
from conftest import run_cli


def test_babyrt_run_generates_and_reports_speed(gqa_model):
    art = gqa_model[1]
    r = run_cli("babyrt-run", art, "-p", "Return the", "-n", "30", "-t", "0")
    assert r.returncode == 0, r.stderr
    expected = babyrt.load(art).generate("Return the", max_new_tokens=30, temperature=0)
    assert r.stdout == expected + "\n"
    assert "tok/s" in r.stderr and "generated 30 tokens" in r.stderr
    # --repeat: the text once, then the median speed of more silent runs
    r = run_cli("babyrt-run", art, "-p", "Return the", "-n", "30", "-t", "0", "--repeat", "3")
    assert r.returncode == 0 and r.stdout == expected + "\n"
    assert "median of 3 runs" in r.stderr


def test_babyrt_run_decodes_several_prompts_as_a_batch(gqa_model):
    art = gqa_model[1]
    r = run_cli("babyrt-run", art, "-p", "Return the", "-p", "A", "-n", "12", "-t", "0")
    assert r.returncode == 0, r.stderr
    want = babyrt.load(art).generate_batch(["Return the", "A"], max_new_tokens=12, temperature=0)
    assert r.stdout == f"--- 0\n{want[0]}\n--- 1\n{want[1]}\n"
    assert "batch of 2: generated 24 tokens" in r.stderr


def test_babyrt_run_sampling_flags_match_python(gqa_model):
    art = gqa_model[1]
    r = run_cli("babyrt-run", art, "-p", "Return", "-n", "25", "-t", "0.9", "-k", "30",
                "--top-p", "0.8", "--seed", "42")
    assert r.returncode == 0, r.stderr
    py = babyrt.load(art).generate("Return", max_new_tokens=25, temperature=0.9, top_k=30,
                                   top_p=0.8, seed=42)
    assert r.stdout == py + "\n"


@pytest.mark.parametrize("args,code,message", [
    (["-p", "x"], 2, "missing ARTIFACT_DIR"),
    (["{art}"], 2, "missing -p"),
    (["{art}", "-p", "x", "-n", "ten"], 2, "-n expects a number"),
    (["{art}", "-p", "x", "--bogus"], 2, "unknown option"),
    (["{art}", "-p", "x", "--repeat", "-2"], 2, "--repeat must be"),
    (["{art}", "-p", "x", "-t", "-1"], 1, "temperature"),
    (["{art}", "-p", "x", "--top-p", "2"], 1, "top_p"),
    (["{art}", "-p", "x" * 100], 1, "context holds"),
    (["/nonexistent", "-p", "x"], 1, "not an artifact directory"),
])
def test_babyrt_run_bad_input(gqa_model, args, code, message):
    args = [a.replace("{art}", str(gqa_model[1])) for a in args]
    r = run_cli("babyrt-run", *args)
    assert r.returncode == code
    assert message in r.stderr
    assert r.stderr.startswith("babyrt-run: error: ")


def test_babyrt_run_corrupt_artifact(tmp_path, gqa_model):
    art = tmp_path / "a"
    art.mkdir()
    (art / "model.pt").write_bytes(b"garbage")
    (art / "tokenizer.bin").write_bytes(b"\x00")
    r = run_cli("babyrt-run", art, "-p", "x")
    assert r.returncode == 1 and "model.pt" in r.stderr and len(r.stderr.splitlines()) == 1


def test_help_for_every_subcommand():
    for sub in ([], ["train"], ["export"], ["generate"], ["demo"]):
        r = run_cli("babyrt", *sub, "--help")
        assert r.returncode == 0 and "usage: babyrt" in r.stdout


@pytest.mark.parametrize("tokenizer", ["char", "sp"])
def test_train_export_generate(tmp_path, corpus_file, tokenizer):
    extra = ["--vocab-size", "512"] if tokenizer == "sp" else []
    r = run_cli("babyrt", "train", "--data", corpus_file, "--out", tmp_path / "ckpt", "--preset",
                "tiny", "--tokenizer", tokenizer, *extra)
    assert r.returncode == 0, r.stderr
    log = (tmp_path / "ckpt" / "log.csv").read_text().splitlines()
    first, last = float(log[1].split(",")[2]), float(log[-1].split(",")[2])
    assert last < first - 0.5, log  # val loss fell
    r = run_cli("babyrt", "export", tmp_path / "ckpt", "--out", tmp_path / "art")
    assert r.returncode == 0, r.stderr
    m = babyrt.load(tmp_path / "art")
    assert m.metadata["tokenizer_kind"] == ("sentencepiece" if tokenizer == "sp" else "char")
    assert m.metadata["add_bos"] == (tokenizer == "sp")
    r = run_cli("babyrt", "generate", tmp_path / "art", "-p", "Return the", "-n", "20",
                "--seed", "1", "--json")
    assert r.returncode == 0, r.stderr
    stats = json.loads(r.stderr.strip().splitlines()[-1])
    assert stats["generated_tokens"] + (stats["finish_reason"] == "eos") >= 1
    assert r.stdout.rstrip("\n") == m.generate("Return the", max_new_tokens=20, seed=1)


@pytest.mark.parametrize("content,message", [
    (b"", "empty"),
    (b"\x00\x01\x02binary", "binary"),
    (b"\xff\xfe bad", "not UTF-8"),
    (b"short", "fewer than one context"),
])
def test_train_rejects_bad_data(tmp_path, content, message):
    data = tmp_path / "data.txt"
    data.write_bytes(content)
    r = run_cli("babyrt", "train", "--data", data, "--out", tmp_path / "o", "--preset", "tiny")
    assert r.returncode == 1 and message in r.stderr, r.stderr
    r = run_cli("babyrt", "train", "--data", tmp_path / "missing.txt", "--out", tmp_path / "o")
    assert r.returncode == 1 and "no such data file" in r.stderr


def test_sp_vocab_too_large_for_corpus(tmp_path):
    data = tmp_path / "data.txt"
    data.write_text("abc def ghi\n" * 50)
    r = run_cli("babyrt", "train", "--data", data, "--out", tmp_path / "o", "--preset", "tiny",
                "--tokenizer", "sp", "--vocab-size", "5000")
    assert r.returncode == 1 and "sentencepiece could not train" in r.stderr, r.stderr


def test_bench_rejects_a_cache_dir_that_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    r = run_cli("babyrt", "bench", "--shape", "stories15M", "--no-peers", "--cache-dir", f)
    assert r.returncode == 1 and "babyrt: error:" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_export_rejects_missing_checkpoint(tmp_path):
    r = run_cli("babyrt", "export", tmp_path, "--out", tmp_path / "art")
    assert r.returncode == 1 and "not a checkpoint directory" in r.stderr


def test_demo_runs_end_to_end(tmp_path):
    r = run_cli("babyrt", "demo", "--workdir", tmp_path, "--max-steps", "20")
    assert r.returncode == 0, r.stderr
    assert "C++ runtime" in r.stdout and "tok/s" in r.stdout
    assert babyrt.load(tmp_path / "artifact").metadata["architecture"] == "llama"
