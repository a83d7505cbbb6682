"""One writer at a time: two builds into one dir at once (one runs, the other refuses naming the holder's PID, and
the manifest stays consistent); the library entry points (pipeline.build, run_verify) lock too; a killed holder's
lock is free at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from reliability_helpers import cli_env
from sfr_export.artifact import Manifest, writer_lock
from sfr_export.errors import LockedError

HOLD = """
import sys, time
from sfr_export.artifact import writer_lock
with writer_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""


def test_two_builds_at_once_one_runs_one_refuses_naming_the_pid(raced_build) -> None:
    out, runs = raced_build
    codes = sorted(rc for _, rc, _ in runs)
    assert codes == [0, 5], runs
    (winner, _, _), = [r for r in runs if r[1] == 0]
    (_, _, refused_err), = [r for r in runs if r[1] == 5]
    assert "Traceback" not in refused_err
    lines = [x for x in refused_err.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and f"(pid {winner})" in lines[0] and str(out) in lines[0], refused_err


def test_after_the_race_the_manifest_is_consistent(raced_build) -> None:
    """Every recorded file exists and matches its checksum; no failure is left over."""
    out, _ = raced_build
    m = Manifest.load(out)
    assert set(m.stages) == {"export:fp32"} and m.stages["export:fp32"].usable
    m.verify_base()
    for name in m.stages:
        m.verify_stage(name)
    assert not m.failures


@pytest.fixture()
def holder(tmp_path: Path):
    """Another process holding the writer lock of a dir; yields (dir, pid)."""
    d = tmp_path / "locked"
    d.mkdir()
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(d)], stdout=subprocess.PIPE, env=cli_env())
    assert p.stdout is not None and p.stdout.readline().strip() == b"held"
    yield d, p
    if p.poll() is None:
        p.kill()
        p.wait(30)


def test_library_build_refuses_a_locked_dir_before_any_work(holder) -> None:
    from sfr_export.models import resolve_model
    from sfr_export.pipeline import BuildConfig, build

    d, p = holder
    with pytest.raises(LockedError, match=rf"\(pid {p.pid}\)"):
        build(d, resolve_model("demo:tiny-mistral"), BuildConfig(verify=False))
    assert sorted(x.name for x in d.iterdir()) == [".sfr-export.lock"]  # nothing written


def test_library_verify_refuses_a_locked_dir(artifact_copy: Path) -> None:
    from sfr_export.stages.verify import VerifyConfig, run_verify

    p = subprocess.Popen([sys.executable, "-c", HOLD, str(artifact_copy)], stdout=subprocess.PIPE, env=cli_env())
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == b"held"
        before = (artifact_copy / "manifest.json").read_bytes()
        with pytest.raises(LockedError, match=rf"\(pid {p.pid}\)"):
            run_verify(artifact_copy, VerifyConfig(reference="fp32", candidates=("fp16",)))
        assert (artifact_copy / "manifest.json").read_bytes() == before
    finally:
        p.kill()
        p.wait(30)


def test_a_killed_holders_lock_is_taken_over(holder) -> None:
    d, p = holder
    with pytest.raises(LockedError):
        with writer_lock(d):
            pass
    p.send_signal(signal.SIGKILL)
    p.wait(30)
    with writer_lock(d):  # the kernel dropped the dead process's flock: no stale lock to clean
        assert (d / ".sfr-export.lock").read_text().strip() == str(os.getpid())


def test_the_lock_is_reentrant_in_one_process(tmp_path: Path) -> None:
    with writer_lock(tmp_path):
        with writer_lock(tmp_path):
            pass
