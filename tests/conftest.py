import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from babyrt.corpus import stdlib_docstrings
from babyrt.export import export_model
from babyrt.training.models import Llama, LlamaConfig
from babyrt.training.tokenizers import CharTokenizer

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    return Path(os.environ.get("BABYRT_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    d = shared_data_dir()
    if not (d / "ALL_eminem.txt").is_file():
        pytest.skip(f"shared test data not found at {d} (set BABYRT_SHARED_DATA)")
    return d


@pytest.fixture(scope="session")
def corpus_text() -> str:
    return stdlib_docstrings(max_chars=60_000)


def export_char_model(tmp: Path, text: str, build, seed: int = 0, dtype: str = "fp32"):
    """build(vocab_size) -> a randomly initialised model over `text`'s characters, exported;
    returns (eager model, artifact dir, tokenizer)."""
    tok = CharTokenizer.train(text)
    tmp.mkdir(parents=True, exist_ok=True)
    info = {**tok.save(tmp), "bos_id": -1, "eos_id": -1, "add_bos": False}
    torch.manual_seed(seed)
    model = build(tok.vocab_size).eval()
    art = export_model(model, info, tmp / "tokenizer.bin", tmp / "artifact", dtype=dtype)
    return model, art, tok


def make_char_artifact(tmp: Path, text: str, cfg: dict, seed: int = 0):
    """A random Llama with config `cfg` over `text`'s characters, exported."""
    return export_char_model(tmp, text, lambda v: Llama(LlamaConfig(vocab_size=v, **cfg)), seed)


GQA = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, context_length=48, multiple_of=16)
MHA = dict(dim=48, n_layers=3, n_heads=3, context_length=40, multiple_of=16)


@pytest.fixture(scope="session")
def gqa_model(tmp_path_factory, corpus_text):
    return make_char_artifact(tmp_path_factory.mktemp("gqa"), corpus_text, GQA)


@pytest.fixture(scope="session")
def mha_model(tmp_path_factory, corpus_text):
    return make_char_artifact(tmp_path_factory.mktemp("mha"), corpus_text, MHA, seed=1)


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory, corpus_text) -> Path:
    p = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    p.write_text(corpus_text)
    return p


class Rerun:
    """pytest -k `select` on `path` in a fresh process with `env` set: the kernels read their
    switches (BABYRT_GEMV, BABYRT_CPU_ISA, ...) once per process. It starts at once and
    result() waits for it, so that several reruns can overlap. One still running
    BABYRT_RERUN_TIMEOUT seconds (default 600) after its start is ended with SIGABRT, which
    pytest's faulthandler answers with every thread's stack, so that a hang fails its test
    with where it hung instead of holding up the suite."""

    def __init__(self, env: dict, path, select: str):
        self._log = tempfile.TemporaryFile(mode="w+")  # a file: no pipe to fill while others run
        self._tmp = tempfile.TemporaryDirectory(prefix="babyrt-rerun-")  # its own, beside others
        self._deadline = time.monotonic() + float(os.environ.get("BABYRT_RERUN_TIMEOUT", "600"))
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
             f"--basetemp={self._tmp.name}/t", str(path), "-k", select],
            env={**os.environ, **env}, stdout=self._log, stderr=subprocess.STDOUT, text=True)

    def result(self) -> tuple[int, str]:
        """Its exit status and output, once it has ended (or been ended at its deadline)."""
        ended = False
        try:
            code = self._proc.wait(timeout=max(self._deadline - time.monotonic(), 0))
        except subprocess.TimeoutExpired:
            ended = True
            self._proc.send_signal(signal.SIGABRT)
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
            code = self._proc.wait()
        self._log.seek(0)
        out = self._log.read()
        if ended:  # the stacks without pytest's own frames, so that the hung test's stay in view
            out = "\n".join(line for line in out.splitlines() if "/_pytest/" not in line and "/pluggy/" not in line)
            out += "\n(rerun ended at its deadline: BABYRT_RERUN_TIMEOUT)"
        return code, out

    def stop(self):
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._log.close()
        self._tmp.cleanup()


def int8_activation_bound(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """[M, N] bound on what rounding x to int8 adds to x @ dequantize(q, s).T: the int8 kernels
    (CPU VNNI, CUDA DP4A) quantize x per block, a step of at most max|x row| / 127, so each
    output may move by half a step times its row's sum of |w|."""
    from babyrt.quantize import dequantize
    w_abs = dequantize(q.cpu(), s.cpu()).abs().sum(1).to(x.device)
    return 0.5 * x.float().abs().amax(-1, keepdim=True) / 127 * w_abs


def run_cli(*args, check=False, timeout=600):
    """Run a console command installed beside this Python."""
    exe = Path(sys.executable).parent / args[0]
    if not exe.exists():
        exe = shutil.which(args[0])
    return subprocess.run([str(exe), *map(str, args[1:])], capture_output=True, text=True,
                          timeout=timeout, check=check)
