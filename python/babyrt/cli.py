"""The `babyrt` command: train, export, generate, demo."""
from __future__ import annotations

import argparse
import json
import sys


def _cmd_train(a) -> None:
    from .training.trainer import train

    overrides = {"device": a.device}
    for key, value in (("max_steps", a.max_steps), ("dtype", a.precision),
                       ("batch_size", a.batch_size), ("peak_tflops", a.peak_tflops),
                       ("ema_decay", a.ema_decay)):
        if value is not None:
            overrides[key] = value
    if a.compile:
        overrides["compile"] = True
    lora = {k: v for k, v in (("rank", a.lora_rank), ("alpha", a.lora_alpha)) if v is not None}
    data = a.data
    if a.task and data is None and not a.resume:  # the task's training corpus, generated
        from pathlib import Path

        from .training import tasks

        Path(a.out).mkdir(parents=True, exist_ok=True)
        data = Path(a.out) / f"{a.task}.txt"
        data.write_text(tasks.corpus(a.task))
    if not a.resume and data is None:
        raise ValueError("--data is required (except with --resume or --task)")
    s = train(data, a.out, a.model, preset=a.preset, tokenizer=a.tokenizer,
              vocab_size=a.vocab_size, base=a.base, train_overrides=overrides,
              lora_overrides=lora, resume=a.resume, stop_at=a.stop_at, task=a.task)
    params = (f"{s['trainable_params']:,} trainable of {s['params']:,} parameters"
              if s["trainable_params"] != s["params"] else f"{s['params']:,} parameters")
    where = f"paused at step {s['stopped_at']}" if s["stopped_at"] else f"{s['steps']} steps"
    print(f"{s['model']}: {params}, {where}, best val loss {s['best_val_loss']:.4f}, "
          f"{s['tokens_per_second'] or 0:,.0f} tok/s, MFU {100 * (s['mfu'] or 0):.2f}%, "
          f"{s['seconds']:.1f} s -> {s['out_dir']}")


def _cmd_export(a) -> None:
    from .export import export_checkpoint

    r = export_checkpoint(a.checkpoint, a.out, dtype=a.dtype, quant=_quant_config(a))
    print(f"wrote {r['path']} ({r['bytes']:,} bytes)")


def _cmd_eval_task(a) -> None:
    from .evaluate import evaluate

    r = evaluate(a.artifact, a.task, n=a.n, seed=a.seed, device=a.device)
    print(f"{a.task}: {r['correct']} / {r['n']} held-out problems exact ({100 * r['accuracy']:.1f}%), "
          f"{r['seconds']:.1f} s")
    for e in r["examples"][:3]:
        print(f"  {e['prompt']}{e['completion']!r} {'ok' if e['correct'] else 'wrong'}")
    if a.json:
        from pathlib import Path

        Path(a.json).write_text(json.dumps(r, indent=1))


def _quant_config(a):
    if a.quantize is None:
        return None
    from .quantize import QuantConfig

    return QuantConfig(group_size=a.group_size, scale_dtype=a.scale_dtype,
                       classifier=not a.float_classifier, embedding=a.int8_embedding)


def _cmd_generate(a) -> None:
    import babyrt

    model = babyrt.load(a.artifact, device=a.device, dtype=a.dtype)
    for piece in model.stream(a.prompt, max_new_tokens=a.n, temperature=a.temperature,
                              top_k=a.top_k, top_p=a.top_p, seed=a.seed, stop=a.stop):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    s = model.last_stats
    tps = s["decode_steps"] / s["decode_seconds"] if s["decode_seconds"] else 0.0
    print(json.dumps({**s, "tokens_per_second": round(tps, 1)}) if a.json else
          f"{s['generated_tokens']} tokens, {tps:.1f} tok/s, {s['finish_reason']}",
          file=sys.stderr)


def _cmd_convert(a) -> None:
    from . import convert

    if (a.from_ is None) == (a.to is None):
        raise ValueError("give exactly one of --from FORMAT or --to FORMAT")
    if a.from_ == "llama2c":
        if not a.tokenizer:
            raise ValueError("--from llama2c needs --tokenizer tokenizer.bin")
        out = convert.llama2c_to_artifact(a.source, a.tokenizer, a.out, dtype=a.dtype)
    elif a.from_ == "hf":
        out = convert.hf_to_artifact(a.source, a.out, tokenizer_bin=a.tokenizer, dtype=a.dtype)
    elif a.to == "hf":
        out = convert.artifact_to_hf(a.source, a.out)
    elif a.from_ == "sentencepiece":
        convert.sentencepiece_to_tokenizer_bin(a.source, a.out)
        out = a.out
    else:
        out = convert.artifact_to_llama2c(a.source, a.out, version=a.version,
                                          group_size=a.group_size)
    print(f"wrote {out}")


def _cmd_demo(a) -> None:
    from .demo import run_demo

    run_demo(workdir=a.workdir, max_steps=a.max_steps, prompt=a.prompt)


def build_parser() -> argparse.ArgumentParser:
    from .training.models import MODELS
    from .training.presets import PRESETS

    p = argparse.ArgumentParser(prog="babyrt", description="Train, export and run small language models.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model on a text file, leaving a checkpoint directory")
    t.add_argument("--model", choices=sorted(MODELS), help="default: the preset's, else llama2")
    t.add_argument("--data", help="UTF-8 text file")
    t.add_argument("--task", choices=["add", "cot-add", "mod-add"],
                   help="train on a generated task corpus (training/tasks.py) and log answer "
                        "accuracy on train and held-out problems at every eval")
    t.add_argument("--out", required=True, help="checkpoint directory to write")
    t.add_argument("--preset", choices=sorted(PRESETS))
    t.add_argument("--tokenizer", choices=["char", "sp"], default="char")
    t.add_argument("--vocab-size", type=int, help="sentencepiece vocabulary size (default 1000)")
    t.add_argument("--max-steps", type=int)
    t.add_argument("--batch-size", type=int)
    t.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    t.add_argument("--precision", choices=["fp32", "bf16", "fp16"],
                   help="autocast dtype (fp16 uses a GradScaler)")
    t.add_argument("--compile", action="store_true", help="torch.compile the model")
    t.add_argument("--peak-tflops", type=float, help="MFU denominator (default: measured)")
    t.add_argument("--ema-decay", type=float,
                   help="evaluate and export a moving average of the weights (e.g. 0.99)")
    t.add_argument("--base", help="babygpt-lora: the trained babygpt checkpoint to adapt")
    t.add_argument("--lora-rank", type=int)
    t.add_argument("--lora-alpha", type=float)
    t.add_argument("--resume", action="store_true", help="continue the run in --out")
    t.add_argument("--stop-at", type=int, help="pause after this step, saving state to resume")
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("export", help="turn a checkpoint directory into an artifact")
    e.add_argument("checkpoint")
    e.add_argument("--out", required=True, help="artifact directory to write")
    e.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="dtype of the float weights and of the activations")
    _add_quant_args(e)
    e.set_defaults(func=_cmd_export)

    g = sub.add_parser("generate", help="generate text from an artifact with the C++ runtime")
    g.add_argument("artifact")
    g.add_argument("-p", "--prompt", required=True)
    g.add_argument("-n", type=int, default=256, help="max new tokens")
    g.add_argument("-t", "--temperature", type=float, default=0.8)
    g.add_argument("-k", "--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--seed", type=int)
    g.add_argument("--stop", action="append")
    g.add_argument("--device", default="cpu")
    g.add_argument("--dtype", choices=["fp32", "bf16", "fp16"])
    g.add_argument("--json", action="store_true", help="print the stats line as JSON")
    g.set_defaults(func=_cmd_generate)

    c = sub.add_parser("convert", help="convert llama2.c checkpoints, transformers Llama folders "
                                       "and sentencepiece models")
    c.add_argument("source", help="checkpoint, tokenizer.model, or (with --to) an artifact")
    c.add_argument("--from", dest="from_", choices=["llama2c", "hf", "sentencepiece"])
    c.add_argument("--to", choices=["llama2c", "hf"])
    c.add_argument("--tokenizer", help="the model's tokenizer.bin (--from hf: default from tokenizer.model)")
    c.add_argument("--out", required=True)
    c.add_argument("--version", type=int, choices=[0, 1, 2], default=1,
                   help="--to llama2c: v0, v1 (fp32) or v2 (Q8_0 int8)")
    c.add_argument("--group-size", type=int, default=64, help="--to llama2c --version 2: Q8_0 group")
    c.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    c.set_defaults(func=_cmd_convert)

    v = sub.add_parser("eval-task", help="exact-match accuracy on held-out task problems (C++ runtime)")
    v.add_argument("artifact")
    v.add_argument("--task", required=True, choices=["add", "cot-add", "mod-add"])
    v.add_argument("--n", type=int, default=1000, help="held-out problems to score")
    v.add_argument("--seed", type=int, default=0, help="the split's seed (as in training)")
    v.add_argument("--device", default="cpu")
    v.add_argument("--json", help="write the result here")
    v.set_defaults(func=_cmd_eval_task)

    b = sub.add_parser("bench", help="pp/tg speed of the runtime next to its peers, same weights")
    b.add_argument("artifact", nargs="?", help="an artifact directory (or use --shape)")
    b.add_argument("--shape", choices=["stories15M", "stories110M", "1b-gqa"],
                   help="a LLaMA of this shape with random weights")
    b.add_argument("--device", default="cpu")
    b.add_argument("--dtype", choices=["fp32", "bf16", "fp16"],
                   help="float dtype (default: fp32 on cpu, bf16 on cuda; as stored for an artifact)")
    b.add_argument("--quantize", choices=["int8"], help="--shape: also run an int8 export")
    b.add_argument("--group-size", type=int, choices=[32, 64, 128])
    b.add_argument("--new-tokens", type=int, default=256)
    b.add_argument("--repeat", type=int, default=3, help="timed runs (median) after one warm-up")
    b.add_argument("--peers", default="cli,eager,hf",
                   help="comma-separated peers run on the same weights: cli (babyrt-run, the "
                        "C++ binary, same artifact), eager (Python loop, static KV cache), "
                        "compile (torch.compile, reduce-overhead on CUDA), hf (transformers "
                        "generate, when installed)")
    b.add_argument("--no-peers", action="store_true", help="skip the peers")
    b.add_argument("--cache-dir", help="--shape: keep the exported artifacts here and reuse "
                                       "them in later runs (same babyrt source only)")
    b.add_argument("--json", help="write the results here")
    b.add_argument("--plot", help="write a bar chart PNG here")
    b.set_defaults(func=lambda a: __import__("babyrt.bench", fromlist=["main"]).main(a))

    d = sub.add_parser("demo", help="train on the stdlib's docstrings, export, generate (no data needed)")
    d.add_argument("--workdir", help="where to put the corpus, checkpoint and artifact "
                                     "(default ~/.cache/babyrt/demo)")
    d.add_argument("--max-steps", type=int)
    d.add_argument("--prompt", default="Return the ")
    d.set_defaults(func=_cmd_demo)
    return p


def _add_quant_args(p) -> None:
    q = p.add_argument_group("int8 weights")
    q.add_argument("--quantize", choices=["int8"], help="store linear weights as int8")
    q.add_argument("--group-size", type=int, choices=[32, 64, 128],
                   help="one scale per this many columns (default: one per output channel)")
    q.add_argument("--scale-dtype", choices=["fp32", "bf16"], default="fp32")
    q.add_argument("--float-classifier", action="store_true",
                   help="keep the output projection float (it is int8 by default)")
    q.add_argument("--int8-embedding", action="store_true",
                   help="store an untied token table as int8 too (a tied one follows the classifier)")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from . import Error
    from .training.data import DataError
    from .training.tokenizers import TokenizerError

    try:
        args.func(args)
    except (Error, DataError, TokenizerError, ValueError, OSError) as e:  # OSError: a bad path
        print(f"babyrt: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
