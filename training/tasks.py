"""Algorithmic tasks: corpora generated with a seed, split into train and held-out problems with no
overlap, and exact-match scoring of a model's answers.

- add:     "45+27=72"                          every pair of 2-digit numbers (8,100 problems)
- cot-add: "45+27=5+7=12,4+2+1=7,ans:72"       the same problems, with the seed's chain of thought
           (units, then tens plus the carry, then the answer)
- mod-add: "a+b=c", c = (a + b) mod 97, every pair 0 <= a, b < 97 (9,409 problems). Each residue
           is one character (U+0100 + n), so a char model sees one token per number, as in the
           grokking experiments (Power et al.; Nanda et al.).

add and cot-add share one split (1,000 held-out problems); mod-add trains on half of its pairs.
A problem is (prompt, answer); the model sees prompt + completion + "\\n" in training, and is scored
on the answer it generates greedily after the prompt.
"""
from __future__ import annotations

import random
import re
from typing import Callable, Optional

import torch

TASKS = ("add", "cot-add", "mod-add")
P = 97
HELDOUT_ADD = 1000
TRAIN_FRACTION_MOD = 0.5


def symbol(n: int) -> str:
    """The one-character name of residue n in mod-add."""
    return chr(0x100 + n)


def _pairs(task: str) -> list:
    if task in ("add", "cot-add"):
        return [(a, b) for a in range(10, 100) for b in range(10, 100)]
    return [(a, b) for a in range(P) for b in range(P)]


def completion(task: str, a: int, b: int) -> str:
    """What follows the prompt in training text (the answer, with its reasoning for cot-add)."""
    if task == "add":
        return str(a + b)
    if task == "cot-add":
        units = a % 10 + b % 10
        carry = units // 10
        tens = a // 10 + b // 10 + carry
        return f"{a % 10}+{b % 10}={units},{a // 10}+{b // 10}+{carry}={tens},ans:{a + b}"
    return symbol((a + b) % P)


def prompt(task: str, a: int, b: int) -> str:
    return f"{symbol(a)}+{symbol(b)}=" if task == "mod-add" else f"{a}+{b}="


def answer(task: str, a: int, b: int) -> str:
    return symbol((a + b) % P) if task == "mod-add" else str(a + b)


def parse_answer(task: str, completion: str) -> Optional[str]:
    """The answer in a generated completion (up to the end of its line), or None."""
    line = completion.split("\n", 1)[0]
    if task == "cot-add":
        m = re.search(r"ans:(\d+)", line)
        return m.group(1) if m else None
    return line[:1] if task == "mod-add" else line.strip()


def split(task: str, seed: int = 0) -> tuple:
    """(train pairs, held-out pairs), disjoint, shuffled with `seed`."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    pairs = _pairs(task)
    random.Random(seed).shuffle(pairs)
    n_held = HELDOUT_ADD if task != "mod-add" else len(pairs) - int(len(pairs) * TRAIN_FRACTION_MOD)
    return pairs[n_held:], pairs[:n_held]


def corpus(task: str, seed: int = 0, epochs: int = 4) -> str:
    """Training text: every train problem once per epoch, in a fresh order each time."""
    train, _ = split(task, seed)
    rng = random.Random(seed + 1)
    lines = []
    for _ in range(epochs):
        order = list(train)
        rng.shuffle(order)
        lines += [prompt(task, a, b) + completion(task, a, b) for a, b in order]
    return "\n".join(lines) + "\n"


def answer_accuracy(model: torch.nn.Module, encode: Callable, decode: Callable, task: str,
                    pairs: list, max_new_tokens: int, batch: int = 256) -> float:
    """Exact match of greedy answers, generated in Python by full recomputation (used during
    training; babyrt eval-task scores the exported artifact with the C++ runtime)."""
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    with torch.no_grad():
        for i in range(0, len(pairs), batch):
            chunk = pairs[i:i + batch]
            prompts = [encode(prompt(task, a, b)) for a, b in chunk]
            n = len(prompts[0])  # every prompt of a task has the same length in tokens
            if any(len(p) != n for p in prompts):
                raise ValueError("prompts of different lengths")
            ids = torch.tensor(prompts, device=device)
            for _ in range(max_new_tokens):
                logits = model(ids[:, -model.cfg.context_length:])
                ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], 1)
            for (a, b), row in zip(chunk, ids[:, n:].tolist()):
                correct += parse_answer(task, decode(row)) == answer(task, a, b)
    model.train()
    return correct / len(pairs)


def max_new_tokens(task: str) -> int:
    return {"add": 4, "cot-add": 24, "mod-add": 1}[task]
