"""The corpus as token ids: encoded once into a numpy memmap, split into train and val."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


class DataError(ValueError):
    pass


def read_corpus(path) -> str:
    """The text of a corpus file; a clear error for missing, empty or binary files."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such data file")
    raw = p.read_bytes()
    if not raw.strip():
        raise DataError(f"{p}: the data file is empty")
    if b"\x00" in raw:
        raise DataError(f"{p}: looks like a binary file (it holds NUL bytes), expected UTF-8 text")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{p}: not UTF-8 text (invalid byte at offset {e.start})") from None


class TokenData:
    """All token ids in one memmap; the first (1 - val_fraction) are train, the rest val."""

    def __init__(self, ids_file: Path, vocab_size: int, val_fraction: float, context_length: int):
        dtype = np.uint16 if vocab_size <= 1 << 16 else np.uint32
        self.ids = np.memmap(ids_file, dtype=dtype, mode="r")
        n_train = int(len(self.ids) * (1 - val_fraction))
        self.splits = {"train": self.ids[:n_train], "val": self.ids[n_train:]}
        self.context_length = context_length
        for name, split in self.splits.items():
            if len(split) <= context_length:
                raise DataError(f"the {name} split has {len(split)} tokens, fewer than one context "
                                f"of {context_length} + 1: use a longer corpus or a shorter context")

    @staticmethod
    def write(ids, ids_file: Path, vocab_size: int) -> None:
        dtype = np.uint16 if vocab_size <= 1 << 16 else np.uint32
        arr = np.memmap(ids_file, dtype=dtype, mode="w+", shape=(len(ids),))
        arr[:] = np.asarray(ids, dtype=dtype)
        arr.flush()

    def batch(self, split: str, batch_size: int, generator: torch.Generator):
        data = self.splits[split]
        T = self.context_length
        starts = torch.randint(len(data) - T, (batch_size,), generator=generator).tolist()
        x = torch.from_numpy(np.stack([data[s:s + T] for s in starts]).astype(np.int64))
        y = torch.from_numpy(np.stack([data[s + 1:s + 1 + T] for s in starts]).astype(np.int64))
        return x, y
