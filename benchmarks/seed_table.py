"""Markdown table of trained checkpoint directories: model, params, steps, best train/val loss,
wall time, tokens/s and MFU (from each run's log.json).

    python benchmarks/seed_table.py CKPT_DIR...
"""
import json
import sys
from pathlib import Path


def row(d: Path) -> str:
    cfg = json.loads((d / "config.json").read_text())
    log = json.loads((d / "log.json").read_text())
    best = min(log, key=lambda h: h["val_loss"])
    tps = [h["tokens_per_second"] for h in log if h["tokens_per_second"]]
    mfu = [h["mfu"] for h in log if h["mfu"]]
    summary = json.loads((d / "summary.json").read_text()) if (d / "summary.json").exists() else {}
    return (f"| {cfg['model']} | {summary.get('params', '?'):,} | {best['step']} / {log[-1]['step']} "
            f"| {best['train_loss']:.4f} | {best['val_loss']:.4f} | {summary.get('seconds', 0):.0f} s "
            f"| {sum(tps) / max(1, len(tps)):,.0f} | {100 * sum(mfu) / max(1, len(mfu)):.2f}% |")


print("| model | params | best step / steps | train loss | val loss | wall time | tokens/s | MFU |")
print("|---|---|---|---|---|---|---|---|")
for arg in sys.argv[1:]:
    if Path(arg, "log.json").exists():
        print(row(Path(arg)))
