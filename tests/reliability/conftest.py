"""Fixtures of the reliability tests: a private copy of the tiny artifact, and one build race shared by the
concurrency and permission tests."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from reliability_helpers import cli_cmd, cli_env, umask022


@pytest.fixture()
def artifact_copy(tiny_artifact: Path, tmp_path: Path) -> Path:
    """A private copy of the session's tiny-mistral artifact (fp32 + fp16 ONNX), free to damage."""
    dst = tmp_path / "art"
    shutil.copytree(tiny_artifact, dst, ignore=shutil.ignore_patterns(".sfr-export.lock"))
    return dst


@pytest.fixture(scope="session")
def raced_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[tuple[int, int, str]]]:
    """Two `build --no-verify` of demo:tiny-mistral into one new dir, started together, under umask 022.
    Returns the dir and (pid, exit code, stderr) of each."""
    out = tmp_path_factory.mktemp("race") / "art"
    cmd = cli_cmd("build", "-m", "demo:tiny-mistral", "-o", str(out), "--no-verify")
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env(),
                              preexec_fn=umask022) for _ in range(2)]
    runs = []
    for p in procs:
        _, err = p.communicate(timeout=600)
        runs.append((p.pid, p.returncode, err.decode("utf-8", "replace")))
    return out, runs
