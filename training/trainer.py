"""The training loop: AdamW with decay on matrices only, warmup + cosine LR, gradient clipping,
gradient accumulation, periodic eval with a tqdm bar and a CSV log, and a checkpoint of the best
val loss. A checkpoint directory holds config.json, checkpoint.pt, tokenizer.bin and the log."""
from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .data import TokenData, read_corpus
from .models import MODELS
from .presets import PRESETS
from .tokenizers import CharTokenizer, SentencePieceTokenizer


@dataclass
class TrainConfig:
    batch_size: int = 32
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
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2))


@torch.no_grad()
def estimate_loss(model, data: TokenData, cfg: TrainConfig, generator: torch.Generator) -> dict:
    model.eval()
    out = {}
    for split in ("train", "val"):
        losses = []
        for _ in range(cfg.eval_iters):
            x, y = data.batch(split, cfg.batch_size, generator)
            logits = model(x.to(cfg.device))
            losses.append(F.cross_entropy(logits.flatten(0, 1), y.to(cfg.device).flatten()).item())
        out[split] = sum(losses) / len(losses)
    model.train()
    return out


def train(data_file, out_dir, model_name: str = "llama2", preset: Optional[str] = None,
          tokenizer: str = "char", vocab_size: Optional[int] = None,
          model_overrides: Optional[dict] = None, train_overrides: Optional[dict] = None,
          progress: bool = True) -> dict:
    """Train `model_name` on `data_file` and leave a checkpoint directory at `out_dir`.
    Returns a summary (steps, losses, seconds, parameters)."""
    if model_name not in MODELS:
        raise ValueError(f"unknown model {model_name!r}; choose from {sorted(MODELS)}")
    model_cls, config_cls = MODELS[model_name]
    p = PRESETS[preset] if preset else {"model": {}, "train": {}}
    tcfg = _override(TrainConfig(), {**p["train"], **(train_overrides or {})})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(tcfg.seed)

    text = read_corpus(data_file)
    if tokenizer == "char":
        tok = CharTokenizer.train(text)
    elif tokenizer == "sp":
        tok = SentencePieceTokenizer.train(Path(data_file), vocab_size or 1000, out)
    else:
        raise ValueError(f"tokenizer must be 'char' or 'sp', got {tokenizer!r}")
    tok_info = tok.save(out)
    TokenData.write(tok.encode(text), out / "tokens.bin", tok.vocab_size)

    mcfg = config_cls(**{**p["model"], **(model_overrides or {}), "vocab_size": tok.vocab_size})
    data = TokenData(out / "tokens.bin", tok.vocab_size, tcfg.val_fraction, mcfg.context_length)
    model = model_cls(mcfg).to(tcfg.device)
    n_params = sum(q.numel() for q in model.parameters())
    optimizer = configure_optimizer(model, tcfg)
    config = {"model": model_name, "model_config": mcfg.to_dict(), "train_config": asdict(tcfg),
              "tokenizer": {**tok_info, "bos_id": tok.bos_id, "eos_id": tok.eos_id,
                            "add_bos": tok.add_bos}}
    (out / "config.json").write_text(json.dumps(config, indent=1))

    gen = torch.Generator().manual_seed(tcfg.seed)
    eval_gen = torch.Generator().manual_seed(tcfg.seed + 1)
    best_val, history = float("inf"), []
    log = open(out / "log.csv", "w", newline="")
    writer = csv.writer(log)
    writer.writerow(["step", "train_loss", "val_loss", "lr", "seconds"])
    t0 = time.time()
    bar = tqdm(range(tcfg.max_steps + 1), desc=f"train {model_name}", disable=not progress,
               unit="step")
    model.train()
    for step in bar:
        if step % tcfg.eval_interval == 0 or step == tcfg.max_steps:
            losses = estimate_loss(model, data, tcfg, eval_gen)
            lr = tcfg.lr_at(step)
            writer.writerow([step, f"{losses['train']:.4f}", f"{losses['val']:.4f}", lr,
                             f"{time.time() - t0:.1f}"])
            log.flush()
            history.append({"step": step, **losses})
            bar.set_postfix(train=f"{losses['train']:.3f}", val=f"{losses['val']:.3f}")
            if losses["val"] < best_val:
                best_val = losses["val"]
                torch.save({"model": model.state_dict(), "step": step, "val_loss": best_val},
                           out / "checkpoint.pt")
        if step == tcfg.max_steps:
            break
        for g in optimizer.param_groups:
            g["lr"] = tcfg.lr_at(step)
        for _ in range(tcfg.grad_accum):
            x, y = data.batch("train", tcfg.batch_size, gen)
            logits = model(x.to(tcfg.device))
            loss = F.cross_entropy(logits.flatten(0, 1), y.to(tcfg.device).flatten())
            (loss / tcfg.grad_accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    log.close()
    return {"steps": tcfg.max_steps, "params": n_params, "best_val_loss": best_val,
            "history": history, "seconds": time.time() - t0, "out_dir": str(out)}


def load_checkpoint(ckpt_dir):
    """(model in eval mode, config dict) from a checkpoint directory."""
    ckpt_dir = Path(ckpt_dir)
    cfg_file = ckpt_dir / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{ckpt_dir}: not a checkpoint directory (no config.json)")
    config = json.loads(cfg_file.read_text())
    model_cls, config_cls = MODELS[config["model"]]
    model = model_cls(config_cls(**config["model_config"]))
    state = torch.load(ckpt_dir / "checkpoint.pt", map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise ValueError(f"{ckpt_dir}: the checkpoint does not match its config: "
                         f"{str(e).splitlines()[0]}") from None
    return model.eval(), config
