import struct
from pathlib import Path

import pytest
import sentencepiece as spm

import babyrt
from babyrt import tokenizer_bin
from babyrt.training.tokenizers import SentencePieceTokenizer

EXTRA_LINES = ["", " ", "  two  spaces\tand\ttabs  ", "héllo wörld 😀 日本語", "1234567 x",
               "<0x41> <s> </s> <unk>", "\x01\x7f control"]


def cpp_tokenizer(sp: spm.SentencePieceProcessor, tokenizer_bin_path: Path):
    return babyrt._C.Tokenizer(tokenizer_bin_path.read_bytes(), sp.vocab_size(), sp.bos_id(),
                               sp.eos_id(), True)


def check_parity(sp, tok, lines):
    mismatches = [l for l in lines if tok.encode(l) != sp.encode(l)]
    assert not mismatches, f"{len(mismatches)} lines differ, first: {mismatches[0]!r}"
    bad_decode = [l for l in lines if tok.decode(tok.encode(l)) != l]
    assert not bad_decode, f"round trip fails on {bad_decode[0]!r}"


def test_llama2_tokenizer_matches_sentencepiece(shared_data):
    d = shared_data / "llama2_tokenizer"
    sp = spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))
    tok = cpp_tokenizer(sp, d / "tokenizer.bin")
    lines = (shared_data / "ALL_eminem.txt").read_text(encoding="utf-8").split("\n")
    assert len(lines) > 23000
    check_parity(sp, tok, lines + EXTRA_LINES)
    assert tok.encode("hello", add_bos=True)[0] == sp.bos_id()
    # A literal U+2581 is a space to sentencepiece.
    assert tok.encode("a\u2581b \u2581") == sp.encode("a\u2581b \u2581")


def test_our_exporter_reproduces_llama2c_tokenizer_bin(shared_data, tmp_path):
    d = shared_data / "llama2_tokenizer"
    tokenizer_bin.write_from_sentencepiece(tmp_path / "t.bin", d / "tokenizer.model")
    ours = tokenizer_bin.read(tmp_path / "t.bin", 32000)
    theirs = tokenizer_bin.read(d / "tokenizer.bin", 32000)
    assert ours == theirs


@pytest.fixture(scope="module")
def trained_bpe(shared_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("bpe")
    tok = SentencePieceTokenizer.train(shared_data / "ALL_eminem.txt", 2000, out)
    tok.save(out)
    return tok.sp, out / "tokenizer.bin"


def test_babyrt_trained_bpe_matches_sentencepiece(shared_data, trained_bpe):
    sp, path = trained_bpe
    tok = cpp_tokenizer(sp, path)
    lines = (shared_data / "ALL_eminem.txt").read_text(encoding="utf-8").split("\n")
    check_parity(sp, tok, lines + EXTRA_LINES)
    # A whole multi-line text encodes as sentencepiece does too (newlines by byte fallback).
    text = "\n".join(lines[:200])
    assert tok.encode(text) == sp.encode(text)


def records(*pieces, max_len=None):
    body = b"".join(struct.pack("<fI", -float(i), len(p)) + p for i, p in enumerate(pieces))
    return struct.pack("<I", max_len if max_len is not None else max(map(len, pieces))) + body


@pytest.mark.parametrize("data,vocab,message", [
    (b"", 2, "too short"),
    (b"\x01\x00", 2, "too short"),
    (records(b"a", b"b"), 3, "fewer records"),
    (records(b"a", b"b") + b"\x00" * 9, 2, "bytes after"),
    (records(b"a", b"bcd", max_len=1), 2, "above max_token_length"),
    (struct.pack("<IfI", 8, 0.0, 0xFFFFFFF0) + b"x" * 20, 2, "length"),
    (records(b"a", b"b")[:-1], 2, "needs 1 bytes"),
    (struct.pack("<IfI", 4, float("nan"), 1) + b"a", 1, "NaN"),
])
def test_bad_tokenizer_bin(data, vocab, message):
    with pytest.raises(babyrt.TokenizerError, match=message):
        babyrt._C.Tokenizer(data, vocab)


def test_huge_vocab_size_does_not_allocate():
    with pytest.raises(babyrt.TokenizerError, match="fewer records"):
        babyrt._C.Tokenizer(records(b"a"), 2**40)


def test_char_tokenizer_rejects_unknown_characters():
    tok = babyrt._C.Tokenizer(records(b"a", b"b", "é".encode()), 3, sentencepiece=False)
    assert tok.encode("abéa") == [0, 1, 2, 0]
    assert tok.decode([2, 0]) == "éa"
    with pytest.raises(babyrt.TokenizerError, match="'z' at byte 2"):
        tok.encode("abz")
    with pytest.raises(babyrt.TokenizerError, match="outside the vocabulary"):
        tok.decode([3])


def test_invalid_utf8_decodes_to_replacement_characters(shared_data):
    d = shared_data / "llama2_tokenizer"
    sp = spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))
    tok = cpp_tokenizer(sp, d / "tokenizer.bin")
    smile = tok.encode("😀")  # four byte-fallback tokens after the dummy prefix
    assert tok.decode(smile) == "😀"
    # Invalid UTF-8 decodes as Python's errors="replace" does.
    for cut in (smile[:-1], smile[:2], smile[2:], smile[:1] + smile[2:]):
        raw = b"".join(bytes([int(sp.id_to_piece(i)[3:5], 16)]) for i in cut if i != smile[0])
        assert tok.decode(cut) == raw.decode("utf-8", errors="replace")
