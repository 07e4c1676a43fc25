"""CI smoke of the fuzz harnesses (a few thousand inputs each, from the seed corpora in
tests/fuzz/corpus). The full runs (100,000 inputs each) are recorded in the README."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("atheris")
FUZZ = Path(__file__).parent / "fuzz"


@pytest.mark.parametrize("harness,corpus", [("fuzz_tokenizer_bin", "tokenizer_bin"),
                                            ("fuzz_encode_decode", "encode_decode"),
                                            ("fuzz_metadata", "metadata")])
def test_fuzz_smoke(tmp_path, harness, corpus):
    work = tmp_path / "corpus"
    shutil.copytree(FUZZ / "corpus" / corpus, work)
    r = subprocess.run([sys.executable, str(FUZZ / f"{harness}.py"), "-runs=3000", "-seed=1", "-len_control=0",
                        f"-artifact_prefix={tmp_path}/",
                        str(work)], capture_output=True, text=True, timeout=600, cwd=FUZZ)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Done 3000 runs" in r.stderr
