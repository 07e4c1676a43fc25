"""Writes and reads artifact format v1. What the format is lives in artifact_format.json, the one
definition that the C++ loader embeds too; this module only follows it."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Union

import torch

FORMAT = json.loads((Path(__file__).with_name("artifact_format.json")).read_text())
MODEL_FILE = FORMAT["files"]["model"]
TOKENIZER_FILE = FORMAT["files"]["tokenizer"]
METADATA_RECORD = FORMAT["metadata_record"]


def validate_metadata(metadata: dict) -> None:
    """Raise babyrt.ArtifactError unless `metadata` is valid; the C++ loader does the checking,
    so writer and reader cannot disagree."""
    from . import _C
    _C.validate_metadata(json.dumps(metadata))


def write_artifact(out_dir: Union[str, os.PathLike], module: torch.jit.ScriptModule,
                   metadata: dict, tokenizer_bin: Union[str, os.PathLike]) -> Path:
    """Validate, then write `out_dir` whole or not at all (a temporary directory renamed into
    place). An existing artifact at out_dir is replaced."""
    metadata = {"format_version": FORMAT["format_version"], **metadata}
    validate_metadata(metadata)
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        torch.jit.save(module, str(tmp / MODEL_FILE),
                       _extra_files={METADATA_RECORD: json.dumps(metadata, indent=1)})
        shutil.copyfile(tokenizer_bin, tmp / TOKENIZER_FILE)
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; an artifact is an ordinary dir
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_metadata(artifact_dir: Union[str, os.PathLike]) -> dict:
    """The metadata record of an artifact, without loading the module."""
    with zipfile.ZipFile(Path(artifact_dir) / MODEL_FILE) as z:
        for name in z.namelist():
            if name.endswith("/extra/" + METADATA_RECORD):
                return json.loads(z.read(name))
    raise FileNotFoundError(f"{artifact_dir}: no {METADATA_RECORD} record in {MODEL_FILE}")


def artifact_size(artifact_dir: Union[str, os.PathLike]) -> int:
    """Bytes on disk of the artifact's files."""
    return sum(p.stat().st_size for p in Path(artifact_dir).iterdir() if p.is_file())
