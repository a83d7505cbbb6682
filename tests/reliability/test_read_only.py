"""A read-only artifact: reading commands work; writing ones refuse at once, in one line naming the dir (exit 6),
before any work, and change nothing. Root ignores ``chmod``, so the dir is bind-mounted read-only in a private mount
namespace (skipped where that is not permitted)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from reliability_helpers import read_only_mounts_work, run_cli_read_only


@pytest.fixture()
def ro_artifact(artifact_copy: Path, tmp_path: Path) -> Path:
    probe = tmp_path / "probe"
    probe.mkdir()
    if not read_only_mounts_work(probe):
        pytest.skip("read-only bind mounts need `unshare -m` with CAP_SYS_ADMIN; chmod does not stop root")
    return artifact_copy


@pytest.mark.parametrize("args", [
    ["verify", "{A}", "--reference", "fp32", "--candidates", "fp16"],
    ["export", "-m", "demo:tiny-mistral", "-o", "{A}"],
    ["build", "-m", "demo:tiny-mistral", "-o", "{A}", "--no-verify"],
    ["engine", "{A}", "--precision", "fp16"],
], ids=["verify", "export-up-to-date", "build", "engine"])
def test_writers_refuse_a_read_only_artifact_in_one_line(ro_artifact: Path, args: list[str]) -> None:
    before = (ro_artifact / "manifest.json").read_bytes()
    res = run_cli_read_only(ro_artifact, *[a.replace("{A}", str(ro_artifact)) for a in args])
    line = res.one_error()
    assert res.rc == 6 and str(ro_artifact) in line and "Read-only file system" in line, line
    assert "Embedder on" not in res.output  # refused before any model was opened
    assert (ro_artifact / "manifest.json").read_bytes() == before


def test_readers_work_on_a_read_only_artifact(ro_artifact: Path) -> None:
    res = run_cli_read_only(ro_artifact, "inspect", str(ro_artifact))
    assert res.rc == 0, res.output
    res = run_cli_read_only(ro_artifact, "embed", str(ro_artifact), "hello")
    assert res.rc == 0, res.output
    assert json.loads(res.stdout)["dim"] > 0
