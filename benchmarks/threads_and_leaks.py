"""Two hardening figures on a random stories15M-width char model (dim 288, 6 layers), CPU:

1. Threads: one loaded model, generations on 1 thread vs the same work split over 2 threads,
   torch's intra-op pool pinned to 1 thread, so any speed-up comes from the GIL being released
   while the C++ runtime runs.
2. Leaks: 10,000 short generations (half generate(), half stream()); RSS after a 1,000-generation
   warm-up vs at the end.

    python benchmarks/threads_and_leaks.py [--generations 10000] [--json OUT]
"""
import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import torch

import babyrt
from babyrt.export import export_model
from babyrt.training.models import Llama, LlamaConfig
from babyrt.training.tokenizers import CharTokenizer


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def make_artifact(tmp: Path) -> Path:
    tok = CharTokenizer([chr(c) for c in range(32, 127)])
    info = {**tok.save(tmp), "bos_id": -1, "eos_id": -1, "add_bos": False}
    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=tok.vocab_size, dim=288, n_layers=6, n_heads=6,
                              context_length=256))
    return export_model(model, info, tmp / "tokenizer.bin", tmp / "artifact")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--generations", type=int, default=10_000)
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        model = babyrt.load(make_artifact(Path(d)))
        kw = dict(max_new_tokens=64, temperature=0.8, top_p=0.95)
        jobs = 8
        model.generate("The ", seed=0, **kw)  # warm-up
        t = time.perf_counter()
        for s in range(jobs):
            model.generate("The ", seed=s, **kw)
        one = time.perf_counter() - t

        def work(seeds):
            for s in seeds:
                model.generate("The ", seed=s, **kw)

        threads = [threading.Thread(target=work, args=(range(i, jobs, 2),)) for i in range(2)]
        t = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        two = time.perf_counter() - t

        warm = max(1, a.generations // 10)
        for i in range(a.generations):
            if i == warm:
                rss_warm = rss_bytes()
            if i % 2:
                model.generate("Hi", max_new_tokens=4, seed=i)
            else:
                "".join(model.stream("Hi", max_new_tokens=4, seed=i))
        rss_end = rss_bytes()
    result = {"cpu_cores": os.cpu_count(), "one_thread_seconds": round(one, 3),
              "two_threads_seconds": round(two, 3), "speedup": round(one / two, 2),
              "generations": a.generations, "rss_after_warmup_mb": round(rss_warm / 2**20, 1),
              "rss_end_mb": round(rss_end / 2**20, 1),
              "rss_growth_percent": round(100 * (rss_end - rss_warm) / rss_warm, 2)}
    print(json.dumps(result))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
