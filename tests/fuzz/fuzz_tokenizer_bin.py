"""Fuzz the tokenizer.bin parser: any bytes and any vocab size either load or raise
babyrt.TokenizerError; a loaded tokenizer encodes and decodes without crashing.

    python tests/fuzz/fuzz_tokenizer_bin.py -runs=100000 [CORPUS_DIR...]
"""
import struct
import sys

import atheris
import torch  # noqa: F401  (not instrumented: only babyrt's own Python is)

with atheris.instrument_imports(include=["babyrt", "fuzz_common"]):
    import babyrt


@atheris.instrument_func
def TestOneInput(data: bytes):
    fdp = atheris.FuzzedDataProvider(data)
    vocab = fdp.ConsumeIntInRange(1, 400)
    bos = fdp.ConsumeIntInRange(-1, 3)
    sentencepiece = fdp.ConsumeBool()
    text = fdp.ConsumeUnicodeNoSurrogates(40)
    if fdp.ConsumeBool():  # raw bytes
        blob = fdp.ConsumeBytes(fdp.remaining_bytes())
    else:  # well-formed records with a random header, lengths and scores, then damage
        records = []
        for _ in range(fdp.ConsumeIntInRange(0, vocab + 2)):
            piece = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 6))
            length = len(piece) if fdp.ConsumeIntInRange(0, 9) else fdp.ConsumeInt(4) & 0xFFFFFFFF
            score = fdp.ConsumeBytes(4).ljust(4, b"\0")  # any float32 bits, NaN included
            records.append(score + struct.pack("<I", length) + piece)
        blob = struct.pack("<I", fdp.ConsumeIntInRange(0, 8)) + b"".join(records)
        cut = fdp.ConsumeIntInRange(0, len(blob))
        blob = blob[:cut] if fdp.ConsumeBool() else blob + fdp.ConsumeBytes(4)
    try:
        tok = babyrt._C.Tokenizer(blob, vocab, bos, -1, sentencepiece)
    except babyrt.TokenizerError:
        return
    try:
        ids = tok.encode(text, add_bos=bos >= 0)
    except babyrt.TokenizerError:
        return
    assert all(0 <= i < vocab for i in ids)
    tok.decode(ids)


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
