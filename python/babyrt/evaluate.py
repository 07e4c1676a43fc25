"""babyrt eval-task: exact-match accuracy of an artifact on held-out task problems, the answers
generated greedily by the C++ runtime."""
from __future__ import annotations

import time

from .runtime import load
from .training import tasks


def evaluate(artifact, task: str, n: int = 1000, seed: int = 0, device: str = "cpu") -> dict:
    """Scores the first n held-out problems of `task` (split with `seed`, as in training)."""
    _, held = tasks.split(task, seed)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    held = held[:n]
    model = load(artifact, device=device)
    t = time.perf_counter()
    correct, examples = 0, []
    for a, b in held:
        out = model.generate(tasks.prompt(task, a, b), max_new_tokens=tasks.max_new_tokens(task) + 1,
                             temperature=0.0, stop="\n")
        ok = tasks.parse_answer(task, out) == tasks.answer(task, a, b)
        correct += ok
        if len(examples) < 5:
            examples.append({"prompt": tasks.prompt(task, a, b), "completion": out, "correct": ok})
    return {"task": task, "n": len(held), "correct": correct, "accuracy": correct / len(held),
            "seconds": time.perf_counter() - t, "examples": examples}
