"""python -m babyrt.training.analysis CHECKPOINT_DIR --task TASK --out DIR

Writes, for a LLaMA trained on a task (babyrt train --task):
  accuracy.png   train / held-out answer accuracy over steps (from log.json)
  attention.png  every layer's and head's attention on one held-out prompt + answer
  lens.png       logit lens: held-out accuracy read from each layer's residual stream
  probe.png      (mod-add) a linear probe per layer for (a+b) mod 97, held-out accuracy
  fourier.png    (mod-add) Fourier spectrum of the residue embeddings
  analysis.json  the numbers behind them, and FLOPs per generated token (flops.py)
"""
import argparse
import json
from pathlib import Path

from .. import tasks
from ..tokenizers import load_tokenizer
from ..trainer import load_checkpoint
from . import figures
from .flops import flops_per_generated_token


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m babyrt.training.analysis")
    ap.add_argument("checkpoint")
    ap.add_argument("--task", required=True, choices=tasks.TASKS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    ckpt, out = Path(a.checkpoint), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        model, config = load_checkpoint(ckpt)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"analysis: error: {e}") from None
    if model.architecture != "llama":
        raise SystemExit("the analysis reads LLaMA internals; train with --model llama2 or llama1")
    tok = load_tokenizer(config["tokenizer"], ckpt)
    history = json.loads((ckpt / "log.json").read_text())
    _, held = tasks.split(a.task, a.seed)
    a0, b0 = held[0]
    example = tasks.prompt(a.task, a0, b0) + tasks.completion(a.task, a0, b0)
    r = {"accuracy": figures.accuracy_curve(history, out / "accuracy.png", f"{a.task}: answer accuracy"),
         "attention": figures.attention_maps(model, tok, example, out / "attention.png"),
         "logit_lens": figures.lens(model, tok, a.task, a.seed, out / "lens.png")}
    if a.task == "mod-add":
        r["probe"] = figures.probe(model, tok, a.task, a.seed, out / "probe.png")
        r["fourier"] = figures.fourier(model, tok, out / "fourier.png")
    cfg = model.cfg
    pos = cfg.context_length - 1
    r["flops_per_generated_token"] = {
        "position": pos, "with_rope": flops_per_generated_token(cfg, pos, rope=True),
        "without_rope": flops_per_generated_token(cfg, pos, rope=False)}
    (out / "analysis.json").write_text(json.dumps(r, indent=1))
    print(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()
