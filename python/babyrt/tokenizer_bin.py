"""llama2.c's tokenizer.bin layout, written from a char vocabulary or a sentencepiece model.

    uint32 max_token_length
    per token, in id order: float32 score, uint32 len, len bytes of UTF-8 (no terminator)

The count is not stored: the model's vocab_size says it. As in llama2.c's export, U+2581 becomes
a space, BOS and EOS become "\\n<s>\\n" and "\\n</s>\\n", and byte pieces stay as "<0xHH>".
The C++ reader is cpp/tokenizer/tokenizer.cpp.
"""
from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Sequence, Union

PathLike = Union[str, os.PathLike]


def write(path: PathLike, pieces: Sequence[bytes], scores: Sequence[float]) -> None:
    if len(pieces) != len(scores):
        raise ValueError("pieces and scores differ in length")
    max_len = max((len(p) for p in pieces), default=0)
    out = [struct.pack("<I", max_len)]
    for p, s in zip(pieces, scores):
        out.append(struct.pack("<fI", s, len(p)))
        out.append(p)
    tmp = Path(str(path) + ".tmp")
    tmp.write_bytes(b"".join(out))
    tmp.replace(path)


def read(path: PathLike, vocab_size: int) -> tuple:
    """(pieces, scores); for tests and tools. The runtime's reader is the C++ one."""
    data = Path(path).read_bytes()
    off, pieces, scores = 4, [], []
    for _ in range(vocab_size):
        s, n = struct.unpack_from("<fI", data, off)
        off += 8
        pieces.append(data[off:off + n])
        scores.append(s)
        off += n
    if off != len(data):
        raise ValueError(f"{path}: {len(data) - off} trailing bytes")
    return pieces, scores


def write_char_vocab(path: PathLike, chars: Sequence[str]) -> None:
    write(path, [c.encode("utf-8") for c in chars], [0.0] * len(chars))


def write_from_sentencepiece(path: PathLike, model_path: PathLike) -> dict:
    """Export a sentencepiece model; returns its bos_id, eos_id and vocab_size."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    pieces, scores = [], []
    for i in range(sp.vocab_size()):
        t = sp.id_to_piece(i)
        if i == sp.bos_id():
            t = "\n<s>\n"
        elif i == sp.eos_id():
            t = "\n</s>\n"
        pieces.append(t.replace("\u2581", " ").encode("utf-8"))
        scores.append(sp.get_score(i))
    write(path, pieces, scores)
    return {"bos_id": sp.bos_id(), "eos_id": sp.eos_id(), "vocab_size": sp.vocab_size()}
