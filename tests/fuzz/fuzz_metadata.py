"""Fuzz the artifact metadata parser: any text, and valid records with fields mutated, either
validate or raise babyrt.ArtifactError.

    python tests/fuzz/fuzz_metadata.py -runs=100000 [CORPUS_DIR...]
"""
import json
import sys

import atheris
import torch  # noqa: F401  (not instrumented: only babyrt's own Python is)

with atheris.instrument_imports(include=["babyrt", "fuzz_common"]):
    import babyrt
    from babyrt.artifact import FORMAT

VALID = {"format_version": 1, "architecture": "llama", "vocab_size": 10, "context_length": 8,
         "n_layers": 1, "n_kv_heads": 1, "head_dim": 4, "dtype": "fp32", "quantization": "none",
         "bos_id": -1, "eos_id": -1, "add_bos": False, "tokenizer_kind": "char",
         "cache_kind": "kv"}
FIELDS = sorted(FORMAT["fields"])


def random_value(fdp):
    kind = fdp.ConsumeIntInRange(0, 7)
    return [lambda: fdp.ConsumeInt(8), lambda: fdp.ConsumeFloat(), lambda: fdp.ConsumeBool(),
            lambda: fdp.ConsumeUnicodeNoSurrogates(8), lambda: None, lambda: [1, "x"],
            lambda: {"a": 1}, lambda: fdp.PickValueInList(["llama", "kv", "fp16", "char"])][kind]()


@atheris.instrument_func
def TestOneInput(data: bytes):
    fdp = atheris.FuzzedDataProvider(data)
    if fdp.ConsumeBool():
        text = fdp.ConsumeUnicodeNoSurrogates(fdp.remaining_bytes())
    else:
        md = dict(VALID)
        for _ in range(fdp.ConsumeIntInRange(0, 4)):
            name = fdp.PickValueInList(FIELDS + ["extra"])
            if fdp.ConsumeIntInRange(0, 5) == 0:
                md.pop(name, None)
            else:
                md[name] = random_value(fdp)
        text = json.dumps(md)
    try:
        babyrt._C.validate_metadata(text)
    except babyrt.ArtifactError:
        pass


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
