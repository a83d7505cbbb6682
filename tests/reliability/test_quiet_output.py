"""Quiet, honest output: each message once ("engine skipped"), a finished stage's spinner stops, and the [dev]
extra pulls no GPU-only package."""

from __future__ import annotations

import importlib.util
import io
import tomllib
from pathlib import Path

import pytest

from reliability_helpers import REPO, run_cli


def test_dev_extra_pulls_no_gpu_only_package() -> None:
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = {e: {r.split(">")[0].split("=")[0].split(";")[0].strip() for r in reqs} for e, reqs in extras.items()}
    assert not names["dev"] & {"triton", "tensorrt", "onnxruntime-gpu"}
    assert "triton" in names["gpu"]


def test_a_finished_stages_spinner_stops() -> None:
    from rich.console import Console
    from rich.progress import Progress

    from sfr_export.commands._ui import StageSpinners

    with Progress(console=Console(file=io.StringIO())) as prog:
        spin = StageSpinners(prog)
        spin("export:fp32", "exporting")
        spin("export:fp32", "validating")
        first = prog.tasks[0]
        assert not first.finished
        spin("engine", "building")
        assert first.finished and first.finished_time is not None  # ticked, clock frozen
        assert not prog.tasks[1].finished
        assert [t.fields["stage"] for t in prog.tasks] == ["export:fp32", "engine"]


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed: no skip to say")
def test_engine_skipped_is_said_once(artifact_copy: Path) -> None:
    """The engine command, then a verify whose default candidates include the skipped engine: the skip is said
    once on stderr (by the engine stage); verify's report lists tensorrt as skipped, with the reason, on stdout."""
    eng = run_cli("engine", str(artifact_copy), "--precision", "fp16")
    assert eng.rc == 0, eng.output
    assert eng.stderr.count("TensorRT is not installed") == 1, eng.stderr
    ver = run_cli("verify", str(artifact_copy), "--reference", "fp32", "--no-cache")
    assert ver.rc == 0, ver.output
    assert "TensorRT" not in ver.stderr, ver.stderr
    assert "| tensorrt | skipped: " in ver.stdout
