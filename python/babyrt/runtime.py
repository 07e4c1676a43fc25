"""The Python face of the C++ runtime: babyrt.load(...) -> Model."""
from __future__ import annotations

import json
import os
import random
from typing import Iterable, Iterator, Optional, Sequence, Union

import torch

from . import _C
from ._C import ArgumentError

_INT64_MAX = 2**63 - 1


def _check_text(name: str, text) -> None:
    """Only valid Unicode can cross into C++ (as UTF-8); lone surrogates cannot."""
    if not isinstance(text, str):
        raise ArgumentError(f"{name} must be a str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ArgumentError(f"{name} is not valid UTF-8 text: {e.reason} at index {e.start}") from None


def _sampling(prompt, max_new_tokens, temperature, top_k, top_p, seed, stop) -> tuple:
    """Checks types here, so that the C++ side sees well-formed values and range-checks them."""
    _check_text("prompt", prompt)
    for name, v in (("max_new_tokens", max_new_tokens), ("top_k", top_k)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ArgumentError(f"{name} must be an int, got {v!r}")
        if abs(v) > _INT64_MAX:
            raise ArgumentError(f"{name} is out of range: {v}")
    for name, v in (("temperature", temperature), ("top_p", top_p)):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ArgumentError(f"{name} must be a number, got {v!r}")
    if seed is None:
        seed = random.SystemRandom().getrandbits(64)
    elif isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise ArgumentError(f"seed must be an int in [0, 2**64), got {seed!r}")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    else:
        try:
            stop = list(stop)
        except TypeError:
            raise ArgumentError(f"stop must be a str or a list of str, got {stop!r}") from None
    for s in stop:
        _check_text("stop string", s)
    return prompt, max_new_tokens, float(temperature), top_k, float(top_p), seed, stop


class Model:
    """A loaded artifact. Thread-safe: several threads may generate at once, each generation
    owns its KV cache; the GIL is released while the model runs."""

    def __init__(self, handle: _C.Model):
        self._m = handle
        self.metadata: dict = json.loads(handle.metadata_json)
        self.last_stats: Optional[dict] = None

    def __repr__(self) -> str:
        md = self.metadata
        return (f"babyrt.Model({md['architecture']}, vocab={md['vocab_size']}, "
                f"context={md['context_length']}, device={self.device}, dtype={self.dtype})")

    @property
    def device(self) -> str:
        return self._m.device

    @property
    def dtype(self) -> str:
        return self._m.dtype

    @property
    def vocab_size(self) -> int:
        return self.metadata["vocab_size"]

    @property
    def context_length(self) -> int:
        return self.metadata["context_length"]

    def generate(self, prompt: str, max_new_tokens: int = 256, temperature: float = 0.8,
                 top_k: int = 0, top_p: float = 0.95, seed: Optional[int] = None,
                 stop: Union[str, Sequence[str], None] = None) -> str:
        """Generate a continuation of `prompt`. temperature 0 is greedy; top_k 0 and top_p 1
        turn those filters off; the same seed gives the same text. Generation ends at EOS,
        before the first stop string, or after max_new_tokens."""
        text, stats = self._m.generate(*_sampling(prompt, max_new_tokens, temperature, top_k,
                                                  top_p, seed, stop))
        self.last_stats = stats
        return text

    def generate_batch(self, prompts: Sequence[str], max_new_tokens: int = 256,
                       temperature: float = 0.8, top_k: int = 0, top_p: float = 0.95,
                       seed: Optional[int] = None,
                       stop: Union[str, Sequence[str], None] = None) -> list:
        """Continuations of several prompts, decoded together as one batch (prompts may differ
        in length); each ends on its own at EOS, a stop string or max_new_tokens. With
        temperature 0 each text equals generate() on its prompt alone. last_stats becomes a
        list of per-prompt stats."""
        if isinstance(prompts, str) or not isinstance(prompts, Sequence):
            raise ArgumentError("prompts must be a list of str")
        if len(prompts) == 0:
            raise ArgumentError("generate_batch needs at least one prompt")
        checked = [_sampling(p, max_new_tokens, temperature, top_k, top_p, seed, stop)
                   for p in prompts]
        texts, stats = self._m.generate_batch([c[0] for c in checked], *checked[0][1:])
        self.last_stats = stats
        return texts

    def stream(self, prompt: str, max_new_tokens: int = 256, temperature: float = 0.8,
               top_k: int = 0, top_p: float = 0.95, seed: Optional[int] = None,
               stop: Union[str, Sequence[str], None] = None) -> Iterator[str]:
        """Like generate(), but yields the text piece by piece as it is made."""
        gen = self._m.start(*_sampling(prompt, max_new_tokens, temperature, top_k, top_p, seed,
                                       stop))
        yield from gen
        self.last_stats = gen.stats

    def encode(self, text: str, bos: Optional[bool] = None) -> list:
        """Token ids of `text`; bos defaults to the artifact's add_bos."""
        _check_text("text", text)
        return self._m.encode(text, self.metadata["add_bos"] if bos is None else bool(bos))

    def decode(self, ids: Iterable[int]) -> str:
        return self._m.decode(_ids(ids))

    def logits(self, ids: Iterable[int], prefill: Optional[int] = None) -> torch.Tensor:
        """float32 logits [len(ids), vocab], computed by the C++ runtime. The first `prefill`
        ids (default: all) run as one call; the rest one at a time through the KV cache."""
        return self._m.logits(_ids(ids), 0 if prefill is None else int(prefill))


def _ids(ids: Iterable[int]) -> list:
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    ids = list(ids)
    if not all(isinstance(i, int) and not isinstance(i, bool) and -2**31 <= i < 2**31 for i in ids):
        raise ArgumentError("token ids must be ints")
    return ids


def load(path: Union[str, os.PathLike], device: str = "cpu", dtype: Optional[str] = None) -> Model:
    """Load an artifact directory. dtype (fp32, bf16, fp16) converts the weights; the default
    keeps the stored dtype."""
    return Model(_C.Model.load(os.fspath(path), device, dtype or ""))


def generate(path: Union[str, os.PathLike], prompt: str, device: str = "cpu", **kwargs) -> str:
    """One-shot: load the artifact at `path` and generate from `prompt` (kwargs as Model.generate)."""
    return load(path, device=device).generate(prompt, **kwargs)
