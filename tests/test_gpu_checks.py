"""tests/gpu_checks.py (the exact criterion's Triton kernel, compiled int8 matmuls) on the CPU, in a subprocess with
TRITON_INTERPRET=1, which must be set before triton is imported. On a GPU that file runs as it is, bf16 included."""
import os
import subprocess
import sys
from pathlib import Path

import pytest


def test_gpu_checks_under_the_triton_interpreter():
    pytest.importorskip("triton")
    here = Path(__file__).parent
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(here / "gpu_checks.py")],
                          cwd=here.parent, env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "skipped" not in done.stdout, done.stdout[-2000:]
