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


def test_the_fused_design_in_bench_equals_eq3_by_hand_under_the_interpreter():
    """bench/exact_fused.py (criterion exact fused into a matmul's epilogue; measured, not used) --check: each exact
    variant's sums against Eq. 3 by hand in float64, on the CPU."""
    pytest.importorskip("triton")
    root = Path(__file__).parent.parent
    done = subprocess.run([sys.executable, str(root / "bench" / "exact_fused.py"), "--check"], cwd=root,
                          env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert done.stdout.count("relative error") == 6, done.stdout  # every variant with Eq. 3 compared
