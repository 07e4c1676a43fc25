"""The figures of babyrt's task analysis, each a PNG plus the numbers behind it."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from .. import tasks  # noqa: E402
from .hidden import attention_probs, logit_lens, residual_stream  # noqa: E402


def accuracy_curve(history: list, path, title: str) -> dict:
    """Train and held-out answer accuracy over training steps (from log.json)."""
    steps = [h["step"] for h in history if "heldout_acc" in h]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [h["train_acc"] for h in history if "heldout_acc" in h], label="train problems")
    ax.plot(steps, [h["heldout_acc"] for h in history if "heldout_acc" in h], label="held-out problems")
    ax.set_xlabel("step")
    ax.set_ylabel("exact-match accuracy")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return {"steps": steps, "final_heldout_acc": history[-1].get("heldout_acc")}


def attention_maps(model, tok, text: str, path) -> dict:
    """Every layer's and head's attention over `text`, one panel each."""
    ids = torch.tensor([tok.encode(text)])
    probs = attention_probs(model, ids)
    L, H = len(probs), probs[0].shape[1]
    fig, axes = plt.subplots(L, H, figsize=(2.2 * H, 2.2 * L), squeeze=False)
    labels = [tok.decode([i]) for i in ids[0].tolist()]
    for l in range(L):
        for h in range(H):
            ax = axes[l][h]
            ax.imshow(probs[l][0, h].numpy(), cmap="viridis", vmin=0, vmax=1)
            ax.set_title(f"layer {l} head {h}", fontsize=8)
            ax.set_xticks(range(len(labels)), labels, fontsize=6)
            ax.set_yticks(range(len(labels)), labels, fontsize=6)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return {"text": text, "layers": L, "heads": H}


def _answer_features(model, tok, task: str, pairs: list) -> tuple:
    """Residual stream at the last prompt token (where the answer is read out) for each pair,
    per layer: list of [n, dim], and the answer token ids."""
    ids = torch.tensor([tok.encode(tasks.prompt(task, a, b)) for a, b in pairs])
    stream = residual_stream(model, ids)
    feats = [x[:, -1].float() for x in stream]
    return feats, stream, ids


def probe(model, tok, task: str, seed: int, path, modulus: int = tasks.P) -> dict:
    """A linear probe per layer for (a + b) mod p, fitted on train problems and scored on
    held-out ones."""
    train, held = tasks.split(task, seed)
    xtr, _, _ = _answer_features(model, tok, task, train)
    xte, _, _ = _answer_features(model, tok, task, held)
    ytr = torch.tensor([(a + b) % modulus for a, b in train])
    yte = torch.tensor([(a + b) % modulus for a, b in held])
    accs = []
    for ftr, fte in zip(xtr, xte):
        mu, sd = ftr.mean(0), ftr.std(0) + 1e-6
        lin = torch.nn.Linear(ftr.shape[1], modulus)
        opt = torch.optim.Adam(lin.parameters(), lr=1e-2, weight_decay=1e-4)
        for _ in range(500):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(lin((ftr - mu) / sd), ytr).backward()
            opt.step()
        with torch.no_grad():
            accs.append((lin((fte - mu) / sd).argmax(-1) == yte).float().mean().item())
    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = ["embed"] + [f"block {i}" for i in range(1, len(accs))]
    ax.bar(names, accs)
    ax.set_ylim(0, 1)
    ax.set_ylabel(f"held-out accuracy, (a+b) mod {modulus}")
    ax.set_title("linear probe on the residual stream at '='")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return {"layers": names, "heldout_acc": accs}


def lens(model, tok, task: str, seed: int, path) -> dict:
    """Logit lens: held-out accuracy of the first completion token (the answer's first
    character; for cot-add the first step of the reasoning) read from each layer's stream."""
    _, held = tasks.split(task, seed)
    held = held[:1000]
    _, stream, _ = _answer_features(model, tok, task, held)
    want = torch.tensor([tok.encode(tasks.completion(task, a, b))[0] for a, b in held])
    accs = [(lg[:, -1].argmax(-1) == want).float().mean().item() for lg in logit_lens(model, stream)]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = ["embed"] + [f"block {i}" for i in range(1, len(accs))]
    ax.plot(names, accs, marker="o")
    ax.set_ylim(0, 1)
    ax.set_ylabel("held-out accuracy, first completion token")
    ax.set_title("logit lens")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return {"layers": names, "heldout_acc": accs}


def fourier(model, tok, path, modulus: int = tasks.P) -> dict:
    """Power of the residue embeddings over the frequencies of Z_p (Nanda et al.): a grokked
    model concentrates on a few key frequencies."""
    ids = [tok.encode(tasks.symbol(n))[0] for n in range(modulus)]
    emb = model.tok_embeddings.weight[ids].detach().float()  # [p, dim]
    power = torch.fft.rfft(emb, dim=0).abs().pow(2).sum(-1)  # [p // 2 + 1]
    power = power / power[1:].sum()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(range(1, len(power)), power[1:].numpy())
    ax.set_xlabel("frequency k (cycles over the 97 residues)")
    ax.set_ylabel("share of embedding power")
    ax.set_title("Fourier spectrum of the residue embeddings")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    top = torch.argsort(power[1:], descending=True)[:5] + 1
    return {"top_frequencies": top.tolist(), "top5_share": power[top].sum().item()}
