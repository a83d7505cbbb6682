"""Kernel tests run Triton in subprocesses: the interpreter (TRITON_INTERPRET=1) must be chosen before triton is
first imported, and another test area may already have imported it in this process."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from kernels_subproc import INTERPRETER_CASES, run_python  # noqa: E402


@pytest.fixture(scope="session")
def interpreter_results() -> dict:
    return run_python(INTERPRETER_CASES, interpret=True)
