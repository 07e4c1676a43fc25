"""Tokenizers for training: char-level, or a sentencepiece BPE trained on the corpus.

Both write llama2.c's tokenizer.bin for the runtime. The sentencepiece options are chosen so that
the runtime's llama2.c-style encoder reproduces sentencepiece exactly: identity normalisation,
whitespace kept as is, a dummy prefix, and byte fallback for characters with no piece.
"""
from __future__ import annotations

import os
from pathlib import Path

from babyrt import tokenizer_bin


class TokenizerError(ValueError):
    pass


class CharTokenizer:
    kind = "char"
    bos_id = eos_id = -1
    add_bos = False

    def __init__(self, chars):
        self.chars = list(chars)
        self.stoi = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def train(cls, text: str) -> "CharTokenizer":
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list:
        try:
            return [self.stoi[c] for c in text]
        except KeyError as e:
            raise TokenizerError(f"character {e.args[0]!r} is not in the char vocabulary") from None

    def decode(self, ids) -> str:
        return "".join(self.chars[i] for i in ids)

    def info(self) -> dict:
        """What a checkpoint's config records to rebuild this tokenizer (load_tokenizer)."""
        return {"kind": self.kind, "chars": self.chars}

    def save(self, out_dir: Path) -> dict:
        tokenizer_bin.write_char_vocab(out_dir / "tokenizer.bin", self.chars)
        return self.info()


class SentencePieceTokenizer:
    kind = "sentencepiece"
    add_bos = True

    def __init__(self, model_file: Path):
        import sentencepiece as spm

        self.model_file = Path(model_file)
        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()

    @classmethod
    def train(cls, data_file: Path, vocab_size: int, out_dir: Path) -> "SentencePieceTokenizer":
        import sentencepiece as spm

        prefix = out_dir / "tokenizer"
        try:
            spm.SentencePieceTrainer.train(
                input=str(data_file), model_prefix=str(prefix), vocab_size=vocab_size,
                model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
                remove_extra_whitespaces=False, add_dummy_prefix=True, split_digits=True,
                allow_whitespace_only_pieces=True, character_coverage=1.0,
                unk_id=0, bos_id=1, eos_id=2, pad_id=-1, max_sentence_length=1 << 16,
                num_threads=os.cpu_count() or 1, minloglevel=2)
        except RuntimeError as e:
            raise TokenizerError(f"sentencepiece could not train a {vocab_size}-piece vocabulary "
                                 f"on {data_file}: {str(e).splitlines()[-1]}") from None
        return cls(prefix.with_suffix(".model"))

    @property
    def vocab_size(self) -> int:
        return self.sp.vocab_size()

    def encode(self, text: str) -> list:
        return self.sp.encode(text)

    def decode(self, ids) -> str:
        return self.sp.decode(list(ids))

    def info(self) -> dict:
        """What a checkpoint's config records to rebuild this tokenizer (load_tokenizer)."""
        return {"kind": self.kind, "model_file": "tokenizer.model"}

    def save(self, out_dir: Path) -> dict:
        target = out_dir / "tokenizer.model"
        if self.model_file.resolve() != target.resolve():
            target.write_bytes(self.model_file.read_bytes())
        tokenizer_bin.write_from_sentencepiece(out_dir / "tokenizer.bin", target)
        return self.info()


def load_tokenizer(info: dict, ckpt_dir: Path):
    """The tokenizer described by a checkpoint's config."""
    if info["kind"] == "char":
        return CharTokenizer(info["chars"])
    return SentencePieceTokenizer(ckpt_dir / info["model_file"])
