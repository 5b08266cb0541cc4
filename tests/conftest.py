"""Shared test helpers. `from conftest import shared_file` works in every test file: pytest puts tests/ on
sys.path (there is no tests/__init__.py), and the repo root is added below so the modules under test import."""
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root, for `import data`, `import llama`


def shared_file(name: str) -> Path:
    """data_dir()/name; if it is missing, fail under CI=true (never skip there), otherwise skip."""
    from data import data_dir  # imported here so a broken data.py breaks only the tests that use it

    path = data_dir() / name
    if not path.exists():
        message = f"shared data file {path} not found (set LORAPRUNE_DATA to the folder holding {name})"
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture
def shared():
    """The shared_file helper as a fixture: `def test_x(shared): path = shared("tok512.model")`."""
    return shared_file


@pytest.fixture(scope="module")
def one_thread():
    """Whole-run tests on the 260K-parameter model gain nothing from threads, and on a busy 2-core machine
    they cost 10x: one thread for the module, restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
