"""The trainer: every family member trains from the command line, LoRA touches only its
adapters, resume is bit-identical, DDP equals one process, and bad input is refused."""
import json
import subprocess
import sys

import pytest
import torch

import babyrt
from babyrt.training.models.lora import LoRALinear
from babyrt.training.trainer import load_checkpoint, train
from conftest import run_cli


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


@pytest.mark.parametrize("model", ["bigram", "ngram", "babygpt", "llama1", "llama2"])
def test_train_and_export_every_model(tmp_path, corpus_file, model):
    r = run_cli("babyrt", "train", "--model", model, "--data", corpus_file, "--out",
                tmp_path / "ckpt", "--preset", "tiny", "--max-steps", "20")
    assert r.returncode == 0, r.stderr
    hist = json.loads((tmp_path / "ckpt" / "log.json").read_text())
    assert hist[-1]["val_loss"] < hist[0]["val_loss"]
    assert hist[-1]["tokens_per_second"] > 0
    assert hist[-1]["mfu"] > 0 or model == "bigram"  # a table lookup does no matmul FLOPs
    assert (tmp_path / "ckpt" / "loss.png").stat().st_size > 1000
    r = run_cli("babyrt", "export", tmp_path / "ckpt", "--out", tmp_path / "art")
    assert r.returncode == 0, r.stderr
    m = babyrt.load(tmp_path / "art")
    assert len(m.generate("Return", max_new_tokens=10, seed=0)) > 0


def test_lora_changes_only_adapters_and_merges_exactly(tmp_path, corpus_text):
    a = corpus_text[:30000]
    (tmp_path / "a.txt").write_text(a)
    # The adapter reuses the base's char vocabulary: the new corpus must fit in it.
    (tmp_path / "b.txt").write_text("".join(c for c in corpus_text[30000:] if c in set(a)))
    r = run_cli("babyrt", "train", "--model", "babygpt", "--data", tmp_path / "a.txt", "--out",
                tmp_path / "base", "--preset", "tiny")
    assert r.returncode == 0, r.stderr
    r = run_cli("babyrt", "train", "--model", "babygpt-lora", "--base", tmp_path / "base",
                "--data", tmp_path / "b.txt", "--out", tmp_path / "lora", "--preset", "tiny",
                "--lora-rank", "4", "--max-steps", "20")
    assert r.returncode == 0, r.stderr
    assert "trainable of" in r.stdout
    base = weights(tmp_path / "base" / "checkpoint.pt")
    tuned = weights(tmp_path / "lora" / "state.pt")
    for k, v in base.items():
        k2 = k if k in tuned else k.replace(".weight", ".base.weight").replace(".bias", ".base.bias")
        assert torch.equal(tuned[k2], v), f"base weight {k} changed"
    assert any(k.endswith("lora_b") and v.abs().sum() > 0 for k, v in tuned.items())

    model, _ = load_checkpoint(tmp_path / "lora")
    assert any(isinstance(m, LoRALinear) for m in model.modules())
    r = run_cli("babyrt", "export", tmp_path / "lora", "--out", tmp_path / "art")
    assert r.returncode == 0, r.stderr
    rt = babyrt.load(tmp_path / "art")
    ids = rt.encode("Return the value of")
    with torch.no_grad():
        ref = model(torch.tensor([ids]))[0]
    assert (rt.logits(ids) - ref).abs().max() <= 1e-4


def test_lora_needs_a_babygpt_base(tmp_path, corpus_file):
    r = run_cli("babyrt", "train", "--model", "babygpt-lora", "--data", corpus_file, "--out",
                tmp_path / "o", "--preset", "tiny")
    assert r.returncode == 1 and "--base" in r.stderr


@pytest.mark.parametrize("ema_decay", [0.0, 0.9])
def test_resume_is_bit_identical(tmp_path, corpus_file, ema_decay):
    kw = dict(model_name="llama2", preset="tiny", progress=False,
              train_overrides={"max_steps": 24, "eval_interval": 8, "ema_decay": ema_decay},
              model_overrides={"dropout": 0.1})
    train(corpus_file, tmp_path / "straight", **kw)
    paused = train(corpus_file, tmp_path / "resumed", stop_at=13, **kw)
    assert paused["stopped_at"] == 13
    train(None, tmp_path / "resumed", resume=True, progress=False)
    a, b = weights(tmp_path / "straight" / "state.pt"), weights(tmp_path / "resumed" / "state.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    la = json.loads((tmp_path / "straight" / "log.json").read_text())
    lb = json.loads((tmp_path / "resumed" / "log.json").read_text())
    assert [h["val_loss"] for h in la] == [h["val_loss"] for h in lb]


def test_ema_weights_are_scored_and_exported(tmp_path, corpus_file):
    s = train(corpus_file, tmp_path / "o", "llama2", preset="tiny", progress=False,
              train_overrides={"max_steps": 30, "eval_interval": 30, "ema_decay": 0.8})
    ckpt = torch.load(tmp_path / "o" / "checkpoint.pt", weights_only=True)
    state = torch.load(tmp_path / "o" / "state.pt", weights_only=True)
    assert ckpt["step"] == 30 and s["best_val_loss"] == ckpt["val_loss"]
    assert state["ema"]["n_averaged"].item() == 30
    # The checkpoint holds the average, which differs from the last weights.
    for k, v in ckpt["model"].items():
        assert torch.equal(v, state["ema"]["module." + k]), k
    assert any(not torch.equal(v, state["model"][k]) for k, v in ckpt["model"].items())
    with pytest.raises(ValueError, match="ema_decay"):
        train(corpus_file, tmp_path / "bad", "llama2", preset="tiny", progress=False,
              train_overrides={"ema_decay": 1.0})
    # Switched on at resume: the average starts from the resumed weights.
    train(corpus_file, tmp_path / "late", "llama2", preset="tiny", progress=False,
          train_overrides={"max_steps": 10, "eval_interval": 10})
    before = torch.load(tmp_path / "late" / "state.pt", weights_only=True)["model"]
    train(None, tmp_path / "late", resume=True, progress=False,
          train_overrides={"max_steps": 12, "ema_decay": 0.5})
    log = json.loads((tmp_path / "late" / "log.json").read_text())
    assert [h["step"] for h in log] == [0, 10, 12]  # step 10 is not scored twice
    ema = torch.load(tmp_path / "late" / "state.pt", weights_only=True)["ema"]
    assert ema["n_averaged"].item() == 2
    # Two updates at decay 0.5 from the resumed weights: the average moved off them.
    assert any(not torch.equal(v, ema["module." + k]) for k, v in before.items())


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains(tmp_path, corpus_file, precision):
    s = train(corpus_file, tmp_path / "o", "llama2", preset="tiny", progress=False,
              train_overrides={"dtype": precision, "max_steps": 20})
    assert s["history"][-1]["val_loss"] < s["history"][0]["val_loss"]


def test_ddp_two_processes_equal_one(tmp_path, corpus_file):
    overrides = {"max_steps": 6, "eval_interval": 3, "batch_size": 8}
    train(corpus_file, tmp_path / "single", "llama2", preset="tiny", progress=False,
          train_overrides=overrides)
    script = tmp_path / "ddp.py"
    script.write_text(f"from babyrt.training.trainer import train\n"
                      f"train({str(corpus_file)!r}, {str(tmp_path / 'ddp')!r}, 'llama2', "
                      f"preset='tiny', progress=False, train_overrides={overrides!r})\n")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master-port", "29533", str(script)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = weights(tmp_path / "single" / "state.pt"), weights(tmp_path / "ddp" / "state.pt")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=1e-5), k


def test_checkpoint_that_does_not_match_its_config(tmp_path, corpus_file):
    train(corpus_file, tmp_path / "c", "llama2", preset="tiny", progress=False,
          train_overrides={"max_steps": 2})
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    cfg["model_config"]["dim"] = 64
    (tmp_path / "c" / "config.json").write_text(json.dumps(cfg))
    r = run_cli("babyrt", "export", tmp_path / "c", "--out", tmp_path / "a")
    assert r.returncode == 1 and "does not match its config" in r.stderr


def test_preset_for_another_model(tmp_path, corpus_file):
    r = run_cli("babyrt", "train", "--model", "llama2", "--preset", "seed-babygpt", "--data",
                corpus_file, "--out", tmp_path / "o")
    assert r.returncode == 1 and "is for model 'babygpt'" in r.stderr


def test_resume_with_more_steps_records_them(tmp_path, corpus_file):
    train(corpus_file, tmp_path / "r", "llama2", preset="tiny", progress=False,
          train_overrides={"max_steps": 6, "eval_interval": 3})
    s = train(None, tmp_path / "r", resume=True, progress=False, train_overrides={"max_steps": 9})
    assert s["history"][-1]["step"] == 9
    assert json.loads((tmp_path / "r" / "config.json").read_text())["train_config"]["max_steps"] == 9
