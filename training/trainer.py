"""The training loop, top to bottom: data -> model -> AdamW (decay on matrices only) -> warmup +
cosine LR -> gradient accumulation and clipping -> bf16/fp16 autocast (fp16 with a GradScaler) ->
optional torch.compile -> DDP under torchrun -> an optional moving average of the weights (EMA) ->
eval every N steps with a tqdm bar, CSV/JSON logs, a loss-curve PNG, tokens/s and MFU -> the
best-val checkpoint for export, and a full training state for bit-identical resume.

A checkpoint directory holds config.json, checkpoint.pt (best val weights), state.pt (everything
needed to resume), tokenizer.bin (+ tokenizer.model for sentencepiece), tokens.bin, log.csv,
log.json and loss.png. Every .pt loads with torch.load(weights_only=True).
"""
from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import random
import shutil
import signal
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from .data import TokenData, read_corpus
from .models import MODELS, LoRAConfig, add_lora
from .models.lora import trainable_parameters
from .presets import PRESETS
from .tokenizers import CharTokenizer, SentencePieceTokenizer, load_tokenizer


@dataclass
class TrainConfig:
    batch_size: int = 32          # sequences per optimizer micro-step, across all ranks
    max_steps: int = 1000
    learning_rate: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    grad_accum: int = 1
    eval_interval: int = 200
    eval_iters: int = 20
    val_fraction: float = 0.1
    device: str = "cpu"
    dtype: str = "fp32"           # autocast: fp32 (off), bf16, fp16 (+ GradScaler)
    compile: bool = False
    ema_decay: float = 0.0        # > 0: evaluate and export an exponential moving average of the weights
    peak_tflops: Optional[float] = None  # for MFU; None: measured at start
    seed: int = 1337

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.learning_rate * (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.max_steps - self.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return self.learning_rate * (self.min_lr_ratio + (1 - self.min_lr_ratio) * cosine)


def _override(obj, values: dict):
    names = {f.name for f in fields(obj)}
    for k, v in values.items():
        if k not in names:
            raise ValueError(f"unknown setting {k!r} for {type(obj).__name__}")
        setattr(obj, k, v)
    return obj


def configure_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """Weight decay on matrices (embeddings, linear weights); none on norms and biases."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    fused = cfg.device.startswith("cuda")
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), fused=fused)


def measure_peak_flops(device: str, dtype: str) -> float:
    """Dense matmul FLOP/s on this device at the training dtype: the MFU denominator."""
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    n, reps = (8192, 20) if device.startswith("cuda") else (1024, 5)
    if not device.startswith("cuda"):
        dt = torch.float32
    g = torch.Generator(device=device).manual_seed(0)  # leaves the training RNG alone
    a = torch.randn(n, n, device=device, dtype=dt, generator=g)
    b = torch.randn(n, n, device=device, dtype=dt, generator=g)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    a @ b
    best = float("inf")
    for _ in range(3):  # best of three: the probe is short and clocks vary
        sync()
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 * reps / best


def build_model(config: dict) -> torch.nn.Module:
    """The model a config.json describes (with LoRA adapters for babygpt-lora)."""
    model_cls, config_cls = MODELS[config["model"]]
    model = model_cls(config_cls(**config["model_config"]))
    if config["model"] == "babygpt-lora":
        add_lora(model, LoRAConfig(**config["lora"]))
    return model


def _resolve(model_name, preset):
    p = PRESETS[preset] if preset else {}
    preset_model = p.get("model_name")
    if model_name and preset_model and model_name != preset_model:
        raise ValueError(f"preset {preset!r} is for model {preset_model!r}, not {model_name!r}")
    name = model_name or preset_model or "llama2"
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(MODELS)}")
    return name, p


@contextlib.contextmanager
def _stop_on_signal():
    """SIGINT/SIGTERM ask the loop to stop at the next step boundary and save its state."""
    flag = {"stop": False}
    handlers = {}

    def handler(signum, frame):
        flag["stop"] = True

    if hasattr(signal, "SIGTERM") and _is_main_thread():
        for s in (signal.SIGINT, signal.SIGTERM):
            handlers[s] = signal.signal(s, handler)
    try:
        yield flag
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)


def _is_main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


def _init_distributed(cfg: TrainConfig):
    """(rank, world size); joins the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if cfg.device.startswith("cuda") else "gloo"
        dist.init_process_group(backend)
    if cfg.device.startswith("cuda"):
        cfg.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(cfg.device)
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by {world} processes")
    return dist.get_rank(), world


def _prepare_new(out: Path, data_file, name: str, p: dict, tcfg: TrainConfig, tokenizer: str,
                 vocab_size, base, model_overrides, lora_overrides, rank: int) -> dict:
    """Tokenizer, token file and config.json of a new run (written by rank 0)."""
    text = read_corpus(data_file)
    if name == "babygpt-lora":
        if base is None:
            raise ValueError("babygpt-lora fine-tunes a trained babygpt: pass --base CHECKPOINT_DIR")
        base = Path(base)
        base_config = json.loads((base / "config.json").read_text())
        if base_config["model"] != "babygpt":
            raise ValueError(f"{base}: the LoRA base must be a babygpt checkpoint, "
                             f"not {base_config['model']}")
        for f in ("tokenizer.bin", "tokenizer.model"):
            if (base / f).exists() and rank == 0:
                shutil.copyfile(base / f, out / f)
        tok = load_tokenizer(base_config["tokenizer"], base)
        tok_info = base_config["tokenizer"]
        model_config = base_config["model_config"]
        lora = LoRAConfig(**{**p.get("lora", {}), **(lora_overrides or {})}).to_dict()
    else:
        if tokenizer == "char":
            tok = CharTokenizer.train(text)
        elif tokenizer == "sp":
            if rank == 0:
                SentencePieceTokenizer.train(Path(data_file), vocab_size or 1000, out)
            _barrier()
            tok = SentencePieceTokenizer(out / "tokenizer.model")
        else:
            raise ValueError(f"tokenizer must be 'char' or 'sp', got {tokenizer!r}")
        if rank == 0:
            tok.save(out)
        tok_info = {**tok.info(), "bos_id": tok.bos_id, "eos_id": tok.eos_id,
                    "add_bos": tok.add_bos}
        preset_model = p.get("model_by_name", {}).get(name, p.get("model", {}))
        model_config = {**preset_model, **(model_overrides or {}), "vocab_size": tok.vocab_size}
        lora = None
    if rank == 0:
        TokenData.write(tok.encode(text), out / "tokens.bin", tok.vocab_size)
    model_cls, config_cls = MODELS[name]
    model_config = config_cls(**model_config).to_dict()  # validates, fills defaults
    config = {"model": name, "model_config": model_config, "train_config": asdict(tcfg),
              "tokenizer": tok_info}
    if lora is not None:
        config["lora"] = lora
        config["base"] = str(base)
    if rank == 0:
        (out / "config.json").write_text(json.dumps(config, indent=1))
    _barrier()
    return config


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _plot(history: list, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    steps = [h["step"] for h in history]
    ax.plot(steps, [h["train_loss"] for h in history], label="train")
    ax.plot(steps, [h["val_loss"] for h in history], label="val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def compute_loss(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy; compiled whole (forward + loss) with --compile, so the
    float32 logits never reach memory unfused."""
    logits = model(x)
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())


@torch.no_grad()
def estimate_loss(model, data: TokenData, cfg: TrainConfig, generator: torch.Generator,
                  autocast) -> dict:
    model.eval()
    out = {}
    for split in ("train", "val"):
        total = 0.0
        for _ in range(cfg.eval_iters):
            x, y = data.batch(split, cfg.batch_size, generator)
            with autocast():
                total += compute_loss(model, x.to(cfg.device), y.to(cfg.device)).item()
        out[split] = total / cfg.eval_iters
    model.train()
    return out


def train(data_file, out_dir, model_name: Optional[str] = None, preset: Optional[str] = None,
          tokenizer: str = "char", vocab_size: Optional[int] = None, base=None,
          model_overrides: Optional[dict] = None, train_overrides: Optional[dict] = None,
          lora_overrides: Optional[dict] = None, resume: bool = False,
          stop_at: Optional[int] = None, progress: bool = True, task: Optional[str] = None) -> dict:
    """Train and leave a checkpoint directory at `out_dir`; returns a summary. With resume, the
    run in out_dir continues from its state.pt (max_steps may be raised via train_overrides).
    stop_at pauses after that step, saving the state to resume from. With a task (tasks.py),
    every eval also logs the exact-match accuracy on train and held-out problems."""
    t_start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if resume:
        if not (out / "state.pt").is_file():
            raise FileNotFoundError(f"{out}: nothing to resume (no state.pt)")
        config = json.loads((out / "config.json").read_text())
        name = config["model"]
        tcfg = _override(TrainConfig(), {**config["train_config"], **(train_overrides or {})})
        config_changed = asdict(tcfg) != config["train_config"]  # e.g. a raised max_steps
        config["train_config"] = asdict(tcfg)
    else:
        name, p = _resolve(model_name, preset)
        tcfg = _override(TrainConfig(), {**p.get("train", {}), **(train_overrides or {})})
    if not 0.0 <= tcfg.ema_decay < 1.0:
        raise ValueError(f"ema_decay must be in [0, 1), got {tcfg.ema_decay}")
    if tcfg.dtype not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"dtype must be fp32, bf16 or fp16, got {tcfg.dtype!r}")
    if tcfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device 'cuda' asked for, but no CUDA GPU is available")
    rank, world = _init_distributed(tcfg)
    if resume and config_changed and rank == 0:
        (out / "config.json").write_text(json.dumps(config, indent=1))
    if not resume:
        config = _prepare_new(out, data_file, name, p, tcfg, tokenizer, vocab_size, base,
                              model_overrides, lora_overrides, rank)
    tok_vocab = config["model_config"]["vocab_size"]
    context = config["model_config"].get("context_length") or config["model_config"]["n"] - 1
    data = TokenData(out / "tokens.bin", tok_vocab, tcfg.val_fraction, max(context, 1))

    torch.manual_seed(tcfg.seed)
    if name == "babygpt-lora" and not resume:
        model_cls, config_cls = MODELS[name]
        model = model_cls(config_cls(**config["model_config"]))
        model.load_state_dict(_load_weights(Path(config["base"])))
        add_lora(model, LoRAConfig(**config["lora"]))
    else:
        model = build_model(config)
    model.to(tcfg.device)
    trainable, total_params = trainable_parameters(model)
    flops_per_token = model.flops_per_token()
    optimizer = configure_optimizer(model, tcfg)
    # The average of the weights over the last ~1/(1-decay) steps: it generalises better than the
    # last weights once a small corpus starts to overfit, so it is what evals score and export takes.
    ema = (torch.optim.swa_utils.AveragedModel(
        model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(tcfg.ema_decay),
        use_buffers=True) if tcfg.ema_decay > 0 else None)
    scaler = torch.amp.GradScaler(tcfg.device.split(":")[0], enabled=tcfg.dtype == "fp16")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(tcfg.dtype)
    device_type = tcfg.device.split(":")[0]

    def autocast():
        if amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=amp_dtype)

    gen = torch.Generator().manual_seed(tcfg.seed)
    eval_gen = torch.Generator().manual_seed(tcfg.seed + 1)
    task_metrics = _task_metrics(task, config, out) if task else None
    start_step, best_val, history = 0, float("inf"), []
    if resume:
        st = torch.load(out / "state.pt", map_location=tcfg.device, weights_only=True)
        model.load_state_dict(st["model"])
        optimizer.load_state_dict(st["optimizer"])
        scaler.load_state_dict(st["scaler"])
        if ema is not None and "ema" in st:
            ema.load_state_dict(st["ema"])
        elif ema is not None:  # EMA switched on at resume: it starts from the weights resumed
            ema.module.load_state_dict(model.state_dict())
        gen.set_state(st["data_rng"].cpu())
        eval_gen.set_state(st["eval_rng"].cpu())
        torch.set_rng_state(st["torch_rng"].cpu())
        start_step, best_val, history = st["step"], st["best_val"], json.loads(st["history"])

    train_model = model
    if world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[torch.device(tcfg.device).index] if device_type == "cuda" else None)
    loss_fn = torch.compile(compute_loss) if tcfg.compile else compute_loss
    peak = (tcfg.peak_tflops * 1e12 if tcfg.peak_tflops else
            measure_peak_flops(tcfg.device, tcfg.dtype))

    def save_state(step: int):
        if rank:
            return
        st = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
              "scaler": scaler.state_dict(), "data_rng": gen.get_state(),
              "eval_rng": eval_gen.get_state(), "torch_rng": torch.get_rng_state(),
              "step": step, "best_val": best_val, "history": json.dumps(history)}
        if ema is not None:
            st["ema"] = ema.state_dict()
        torch.save(st, out / "state.pt.tmp")
        os.replace(out / "state.pt.tmp", out / "state.pt")

    def write_logs():
        if rank:
            return
        with open(out / "log.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(history[0]))
            w.writeheader()
            w.writerows(history)
        (out / "log.json").write_text(json.dumps(history, indent=1))
        _plot(history, out / "loss.png", f"{name} ({total_params:,} parameters)")

    per_rank = tcfg.batch_size // world
    tokens_per_step = tcfg.batch_size * tcfg.grad_accum * max(context, 1)
    bar = tqdm(range(start_step, tcfg.max_steps + 1), initial=start_step, total=tcfg.max_steps + 1,
               desc=f"train {name}", disable=not progress or rank != 0, unit="step")
    train_seconds, train_tokens, t_mark = 0.0, 0, time.perf_counter()
    stopped, step = False, start_step
    model.train()
    with _stop_on_signal() as stop_flag:
        for step in bar:
            evaluated = bool(history) and history[-1]["step"] == step  # a finished run resumed
            if (step % tcfg.eval_interval == 0 or step == tcfg.max_steps) and not evaluated:
                if device_type == "cuda":
                    torch.cuda.synchronize()
                train_seconds += time.perf_counter() - t_mark
                scored = ema.module if ema is not None else model
                losses = estimate_loss(scored, data, tcfg, eval_gen, autocast)
                tps = train_tokens / train_seconds if train_seconds > 0 else 0.0
                history.append({"step": step, "train_loss": round(losses["train"], 5),
                                "val_loss": round(losses["val"], 5), "lr": tcfg.lr_at(step),
                                "tokens_per_second": round(tps, 1),
                                "mfu": round(tps * flops_per_token / peak, 5),
                                **(task_metrics(scored) if task_metrics else {})})
                bar.set_postfix(train=f"{losses['train']:.3f}", val=f"{losses['val']:.3f}")
                if losses["val"] < best_val:
                    best_val = losses["val"]
                    if rank == 0:
                        torch.save({"model": scored.state_dict(), "step": step,
                                    "val_loss": best_val}, out / "checkpoint.pt")
                write_logs()
                train_seconds, train_tokens = 0.0, 0
                t_mark = time.perf_counter()
            if step == tcfg.max_steps:
                break
            for g in optimizer.param_groups:
                g["lr"] = tcfg.lr_at(step)
            for micro in range(tcfg.grad_accum):
                x, y = data.batch("train", tcfg.batch_size, gen)
                x = x[rank * per_rank:(rank + 1) * per_rank].to(tcfg.device, non_blocking=True)
                y = y[rank * per_rank:(rank + 1) * per_rank].to(tcfg.device, non_blocking=True)
                last = micro == tcfg.grad_accum - 1
                sync = (contextlib.nullcontext() if last or world == 1 else train_model.no_sync())
                with sync, autocast():
                    loss = loss_fn(train_model, x, y)
                scaler.scale(loss / tcfg.grad_accum).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update_parameters(model)
            train_tokens += tokens_per_step
            if stop_flag["stop"] or (stop_at is not None and step + 1 == stop_at):
                stopped = True
                save_state(step + 1)
                break
    if not stopped:
        save_state(tcfg.max_steps)
    bar.close()
    last = history[-1] if history else {}
    summary = {"model": name, "steps": tcfg.max_steps, "params": total_params,
            "trainable_params": trainable, "best_val_loss": best_val, "history": history,
            "stopped_at": step + 1 if stopped else None, "out_dir": str(out),
            "tokens_per_second": last.get("tokens_per_second"), "mfu": last.get("mfu"),
            "flops_per_token": flops_per_token, "seconds": time.perf_counter() - t_start}
    if rank == 0:
        (out / "summary.json").write_text(
            json.dumps({k: v for k, v in summary.items() if k != "history"}, indent=1))
    return summary


def _task_metrics(task: str, config: dict, out: Path):
    """model -> {"train_acc", "heldout_acc"} on 256 problems of each split (the same ones at
    every eval)."""
    from . import tasks

    tok = load_tokenizer(config["tokenizer"], out)
    train_pairs, held = tasks.split(task)  # seed 0, as the corpus babyrt train --task writes
    rng = random.Random(0)
    train_pairs, held = rng.sample(train_pairs, min(256, len(train_pairs))), held[:256]
    n = tasks.max_new_tokens(task)

    def metrics(model) -> dict:
        acc = [round(tasks.answer_accuracy(model, tok.encode, tok.decode, task, p, n), 4)
               for p in (train_pairs, held)]
        return {"train_acc": acc[0], "heldout_acc": acc[1]}
    return metrics


def _load_weights(ckpt_dir: Path) -> dict:
    path = ckpt_dir / "checkpoint.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{ckpt_dir}: no checkpoint.pt")
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def load_checkpoint(ckpt_dir):
    """(model in eval mode, config dict) from a checkpoint directory."""
    ckpt_dir = Path(ckpt_dir)
    cfg_file = ckpt_dir / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{ckpt_dir}: not a checkpoint directory (no config.json)")
    config = json.loads(cfg_file.read_text())
    model = build_model(config)
    try:
        model.load_state_dict(_load_weights(ckpt_dir))
    except RuntimeError as e:
        raise ValueError(f"{ckpt_dir}: the checkpoint does not match its config: "
                         f"{str(e).splitlines()[0]}") from None
    return model.eval(), config
