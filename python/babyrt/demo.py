"""babyrt demo: train a small LLaMA 2 on the standard library's docstrings, export it, and
generate through the C++ runtime. No data argument, no network."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from .corpus import stdlib_docstrings


def default_workdir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "babyrt" / "demo"


def run_demo(workdir=None, max_steps=None, prompt: str = "Return the ", max_new_tokens: int = 200,
             seed: int = 0, progress: bool = True) -> str:
    import babyrt
    from .export import export_checkpoint
    from .training.trainer import train

    work = Path(workdir) if workdir else default_workdir()
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / "stdlib_docstrings.txt"
    corpus.write_text(stdlib_docstrings())
    print(f"corpus: {corpus} ({corpus.stat().st_size:,} bytes of standard-library docstrings)")
    overrides = {"max_steps": max_steps} if max_steps else {}
    summary = train(corpus, work / "checkpoint", "llama2", preset="demo", tokenizer="char",
                    train_overrides=overrides, progress=progress)
    print(f"trained {summary['params']:,} parameters for {summary['steps']} steps in "
          f"{summary['seconds']:.0f} s; best val loss {summary['best_val_loss']:.3f}")
    art = export_checkpoint(work / "checkpoint", work / "artifact")
    print(f"artifact: {art['path']} ({art['bytes']:,} bytes)")
    model = babyrt.load(art["path"])
    print(f"\n--- C++ runtime, {model!r} ---\n{prompt}", end="")
    t0 = time.time()
    pieces = []
    for piece in model.stream(prompt, max_new_tokens=max_new_tokens, temperature=0.8, top_p=0.95,
                              seed=seed):
        pieces.append(piece)
        sys.stdout.write(piece)
        sys.stdout.flush()
    stats = model.last_stats
    tps = stats["decode_steps"] / stats["decode_seconds"] if stats["decode_seconds"] else 0.0
    print(f"\n---\n{stats['generated_tokens']} tokens, {tps:.0f} tok/s "
          f"({time.time() - t0:.2f} s)")
    return "".join(pieces)
