"""Training throughput and MFU of the trainer's building blocks on the 110M LLaMA shape
(dim 768, 12 layers, 12 heads, hidden 2048, vocab 32000, seq 1024), bf16 autocast, compiled,
fused AdamW. FLOPs per token are the model's flops_per_token() (PaLM appendix B: 6N + 12 L H Q T);
the peak is a bf16 matmul measured in the same run.

    python benchmarks/train_mfu.py [--batch 32] [--steps 30] [--json OUT]
"""
import argparse
import json

import torch

from babyrt.training.models import Llama, LlamaConfig
from babyrt.training.trainer import TrainConfig, compute_loss, configure_optimizer, measure_peak_flops


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    cfg = LlamaConfig(vocab_size=32000, dim=768, n_layers=12, n_heads=12, context_length=1024,
                      multiple_of=256)
    model = Llama(cfg).cuda()
    tcfg = TrainConfig(device="cuda", learning_rate=3e-4)
    opt = configure_optimizer(model, tcfg)
    loss_fn = torch.compile(compute_loss)  # what the trainer runs with --compile
    x = torch.randint(0, cfg.vocab_size, (a.batch, cfg.context_length), device="cuda")
    y = torch.randint(0, cfg.vocab_size, (a.batch, cfg.context_length), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(model, x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(a.warmup):
        step()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(a.steps):
        step()
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1000
    tokens = a.batch * cfg.context_length * a.steps
    tps = tokens / seconds
    peak = measure_peak_flops("cuda", "bf16")
    fpt = model.flops_per_token()
    strict = fpt - 6 * model.tok_embeddings.weight.numel()  # the input embedding is a lookup
    result = {"params": sum(p.numel() for p in model.parameters()), "batch": a.batch,
              "seq": cfg.context_length, "tokens_per_second": round(tps),
              "flops_per_token": fpt, "achieved_tflops": round(tps * fpt / 1e12, 1),
              "peak_bf16_tflops": round(peak / 1e12, 1), "mfu": round(tps * fpt / peak, 4),
              "mfu_without_input_embedding": round(tps * strict / peak, 4),
              "device": torch.cuda.get_device_name()}
    print(json.dumps(result))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
