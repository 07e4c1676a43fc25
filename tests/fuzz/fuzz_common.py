"""Shared pieces of the fuzz harnesses: a small sentencepiece-style tokenizer.bin built in code
(byte fallback, a few merges), so the harnesses need no data files."""
import struct

CONTROL = [b"<unk>", b"\n<s>\n", b"\n</s>\n"]
BYTES = [b"<0x%02X>" % i for i in range(256)]
MERGES = [b" ", b"t", b"h", b"e", b"a", b"n", b"d", b"th", b" t", b"he", b"the", b" the", b"an",
          b" an", b"and", b" and", "é".encode(), "😀".encode(), b"  ", b"   "]
PIECES = CONTROL + BYTES + MERGES
SCORES = [0.0] * (len(CONTROL) + len(BYTES)) + [-float(i) for i in range(len(MERGES))]


def tokenizer_bin(pieces=PIECES, scores=SCORES) -> bytes:
    out = [struct.pack("<I", max(map(len, pieces)))]
    for p, s in zip(pieces, scores):
        out.append(struct.pack("<fI", s, len(p)) + p)
    return b"".join(out)


def make_tokenizer():
    import babyrt
    return babyrt._C.Tokenizer(tokenizer_bin(), len(PIECES), 1, 2, True)
