"""Validation loss of a babyrt checkpoint in fp32 and with int8 weights (per output channel and
group-wise), through the same modules and ops the artifact runs.

    python benchmarks/int8_accuracy.py CHECKPOINT_DIR [--max-windows N] [--kernel-path]
        [--device cpu|cuda] [--json OUT]

The loss is the mean next-token cross-entropy over consecutive, non-overlapping windows of one
context each covering the checkpoint's validation split (the same split training used).
Windows of a context run as the ATen reference (dequantize, then matmul: more rows than the GEMV
kernels take). --kernel-path scores 64-token windows one at a time instead, so that every linear
runs the decode kernels (on the CPU: int8 activations per block of 512), and the same windows
batched through the reference beside them: the difference is what the kernels' activation
rounding costs. On CUDA, whose GEMV takes at most 8 rows, those windows are 8 tokens long (int8
activations per 16 values there).
"""
import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from babyrt.export import inference_model
from babyrt.quantize import QuantConfig
from babyrt.training.trainer import load_checkpoint

SCHEMES = {"fp32": None, "int8 per-channel": QuantConfig(),
           "int8 group 32": QuantConfig(group_size=32), "int8 group 64": QuantConfig(group_size=64),
           "int8 group 128": QuantConfig(group_size=128),
           "int8 per-channel, bf16 scales": QuantConfig(scale_dtype="bf16")}


def val_windows(ckpt: Path, config: dict, max_windows: int) -> torch.Tensor:
    vocab = config["model_config"]["vocab_size"]
    ids = np.memmap(ckpt / "tokens.bin", dtype=np.uint16 if vocab <= 1 << 16 else np.uint32, mode="r")
    val = ids[int(len(ids) * (1 - config["train_config"]["val_fraction"])):]
    T = config["model_config"].get("context_length") or 64
    n = min(max_windows, (len(val) - 1) // T)
    return torch.from_numpy(np.asarray(val[:n * T + 1], dtype=np.int64)), T, n


@torch.no_grad()
def val_loss(model, data: torch.Tensor, T: int, n: int, batch: int = 16, device: str = "cpu") -> float:
    total = 0.0
    for b0 in range(0, n, batch):
        rows = range(b0, min(n, b0 + batch))
        x = torch.stack([data[r * T:(r + 1) * T] for r in rows]).to(device)
        y = torch.stack([data[r * T + 1:(r + 1) * T + 1] for r in rows]).to(device)
        logits = model(x)
        total += F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum").item()
    return total / (n * T)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--max-windows", type=int, default=2000)
    ap.add_argument("--kernel-path", action="store_true",
                    help="short windows one at a time (decode kernels) beside the reference")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json")
    a = ap.parse_args()
    model, config = load_checkpoint(a.checkpoint)
    data, T, n = val_windows(Path(a.checkpoint), config, a.max_windows)
    if a.kernel_path:
        window = 8 if a.device.startswith("cuda") else 64
        n, T = n * T // window, window
    paths = {"kernels": 1, "reference": 16} if a.kernel_path else {"": 16}
    rows = []
    for name, quant in SCHEMES.items():
        try:
            m = inference_model(model, quant=quant).to(a.device)
        except ValueError as e:  # a group size that does not divide some layer
            print(f"{name}: skipped ({e})")
            continue
        for path, batch in paths.items():
            label = f"{name} ({path})" if path else name
            loss = val_loss(m, data, T, n, batch, a.device)
            base = next((r["val_loss"] for r in rows if r["scheme"].startswith("fp32")), loss)
            rows.append({"scheme": label, "val_loss": loss, "delta": loss - base})
            print(f"{label}: val loss {loss:.4f} ({rows[-1]['delta']:+.4f} nats), {n * T:,} tokens")
    if a.json:
        Path(a.json).write_text(json.dumps({"checkpoint": a.checkpoint, "device": a.device,
                                            "tokens": n * T, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
