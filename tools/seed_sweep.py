"""Train several seed-table variants at once on one GPU (each is too small to fill it) and
print a markdown table. Used to pick the seed-* presets.

    python tools/seed_sweep.py DATA OUT_DIR 'NAME:PRESET:{"model": {...}, "train": {...}}' ...
"""
import json
import multiprocessing as mp
import sys
from pathlib import Path


def run(args):
    data, out, name, preset, over = args
    from babyrt.training.trainer import train
    s = train(data, Path(out) / name, preset=preset, progress=False,
              model_overrides=over.get("model"),
              train_overrides={"device": "cuda", "dtype": "bf16", **over.get("train", {})})
    best = min(s["history"], key=lambda h: h["val_loss"])
    return (f"| {name} | {preset} {json.dumps(over)} | {s['params']:,} | {best['step']} | "
            f"{best['train_loss']:.4f} | {best['val_loss']:.4f} | {s['seconds']:.0f} s |")


if __name__ == "__main__":
    data, out = sys.argv[1], sys.argv[2]
    jobs = []
    for spec in sys.argv[3:]:
        name, preset, over = spec.split(":", 2)
        jobs.append((data, out, name, preset, json.loads(over)))
    print("| run | config | params | best step | train | val | time |\n|---|---|---|---|---|---|---|",
          flush=True)
    with mp.get_context("spawn").Pool(len(jobs)) as pool:
        for row in pool.imap_unordered(run, jobs):  # each row as soon as its run ends
            print(row, flush=True)
