"""Fuzz the encoder and decoder: any bytes encode (invalid UTF-8 included) to valid ids; valid
text round-trips exactly; any id list decodes to valid UTF-8 or raises TokenizerError.

    python tests/fuzz/fuzz_encode_decode.py -runs=100000 [CORPUS_DIR...]
"""
import sys

import atheris
import torch  # noqa: F401  (not instrumented: only babyrt's own Python is)

with atheris.instrument_imports(include=["babyrt", "fuzz_common"]):
    import babyrt
    from fuzz_common import PIECES, make_tokenizer

TOK = make_tokenizer()


@atheris.instrument_func
def TestOneInput(data: bytes):
    fdp = atheris.FuzzedDataProvider(data)
    mode = fdp.ConsumeIntInRange(0, 2)
    if mode == 0:  # arbitrary bytes, often invalid UTF-8
        ids = TOK.encode(fdp.ConsumeBytes(fdp.remaining_bytes()))
        assert all(0 <= i < len(PIECES) for i in ids)
        TOK.decode(ids).encode("utf-8")
    elif mode == 1:  # valid text round-trips (a literal U+2581 is a space to sentencepiece)
        text = fdp.ConsumeUnicodeNoSurrogates(fdp.remaining_bytes()).replace("\u2581", " ")
        ids = TOK.encode(text)
        back = TOK.decode(ids)
        assert back == text, (text, ids, back)
    else:  # arbitrary ids
        ids = [fdp.ConsumeIntInRange(-5, len(PIECES) + 5) for _ in range(fdp.ConsumeIntInRange(0, 64))]
        try:
            TOK.decode(ids).encode("utf-8")
        except babyrt.TokenizerError:
            assert any(not 0 <= i < len(PIECES) for i in ids)


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
