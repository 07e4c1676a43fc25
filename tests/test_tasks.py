"""Task corpora (training/tasks.py), their evaluation through the C++ runtime, the analysis
figures and the FLOPs formula."""
import json

import pytest
import torch

from babyrt.training import tasks
from babyrt.training.analysis.flops import flops_per_generated_token
from babyrt.training.models import Llama, LlamaConfig
from conftest import run_cli


def test_cot_format_is_the_seeds():
    assert tasks.prompt("cot-add", 45, 27) + tasks.completion("cot-add", 45, 27) == \
        "45+27=5+7=12,4+2+1=7,ans:72"
    assert tasks.completion("cot-add", 85, 47) == "5+7=12,8+4+1=13,ans:132"
    assert tasks.completion("add", 45, 27) == "72"
    assert tasks.parse_answer("cot-add", "5+7=12,4+2+1=7,ans:72\n99") == "72"
    assert tasks.parse_answer("cot-add", "5+7=12") is None
    assert tasks.answer("mod-add", 60, 50) == tasks.symbol(13)


@pytest.mark.parametrize("task", tasks.TASKS)
def test_splits_are_disjoint_seeded_and_cover_every_problem(task):
    train, held = tasks.split(task, seed=0)
    assert not set(train) & set(held)
    assert len(held) >= 1000 and len(train) + len(held) == (8100 if task != "mod-add" else 97 * 97)
    assert tasks.split(task, seed=0) == (train, held)
    assert tasks.split(task, seed=1)[1] != held
    text = tasks.corpus(task)
    held_lines = {tasks.prompt(task, a, b) for a, b in held}
    assert not any(line.split("=")[0] + "=" in held_lines for line in text.splitlines())


def test_add_and_cot_share_the_held_out_problems():
    assert tasks.split("add")[1] == tasks.split("cot-add")[1]


def test_flops_formula():
    cfg = LlamaConfig(vocab_size=100, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16)
    model = Llama(cfg)
    n_matmul = sum(p.numel() for n, p in model.named_parameters()
                   if p.dim() == 2 and "tok_embeddings" not in n)
    base = 2 * n_matmul + 4 * 2 * 4 * 16 * 11
    assert flops_per_generated_token(cfg, 10, rope=False) == base
    assert flops_per_generated_token(cfg, 10, rope=True) == base + 3 * 2 * (4 + 2) * 16


def test_train_task_export_eval_and_analysis(tmp_path):
    out = tmp_path / "run"
    r = run_cli("babyrt", "train", "--task", "mod-add", "--preset", "task-mod-add", "--out", out,
                "--max-steps", "20")
    assert r.returncode == 0, r.stderr[-2000:]
    log = json.loads((out / "log.json").read_text())
    assert {"train_acc", "heldout_acc"} <= set(log[-1])
    r = run_cli("babyrt", "export", out, "--out", tmp_path / "art", check=True)
    r = run_cli("babyrt", "eval-task", tmp_path / "art", "--task", "mod-add", "--n", "50",
                "--json", tmp_path / "eval.json")
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "eval.json").read_text())
    assert res["n"] == 50 and 0 <= res["accuracy"] <= 1 and "held-out problems exact" in r.stdout
    r = run_cli("python", "-m", "babyrt.training.analysis", out, "--task", "mod-add", "--out",
                tmp_path / "fig")
    assert r.returncode == 0, r.stderr[-2000:]
    for name in ("accuracy", "attention", "lens", "probe", "fourier"):
        assert (tmp_path / "fig" / f"{name}.png").stat().st_size > 1000
    a = json.loads((tmp_path / "fig" / "analysis.json").read_text())
    assert len(a["probe"]["heldout_acc"]) == 3  # embeddings + 2 blocks
    bad = run_cli("babyrt", "eval-task", tmp_path / "art", "--task", "mod-add", "--n", "0")
    assert bad.returncode == 1 and "n must be" in bad.stderr
    bad = run_cli("babyrt", "eval-task", tmp_path / "art", "--task", "cot-add", "--n", "5")
    assert bad.returncode == 1 and "not in the char-level vocabulary" in bad.stderr
    bad = run_cli("python", "-m", "babyrt.training.analysis", tmp_path / "nothing", "--task",
                  "add", "--out", tmp_path / "f2")
    assert bad.returncode == 1 and "not a checkpoint directory" in bad.stderr
