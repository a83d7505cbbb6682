"""The one subprocess-worker protocol: stages and the benchmark run heavy jobs in a fresh ``python -m`` process,
so that their memory comes back and their peak RSS is their own.

The parent writes the job as JSON; the child prints ``PROGRESS <text>`` lines, then ``RESULT <json>`` or
``ERROR <json>`` on stdout (its stderr goes to the log). An ``SfrExportError`` raised in the child is raised again
in the parent as the same class with the same fields (``worst_text``, ``min_cosine``, ``status``, ...).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import SfrExportError, WorkerError, error_from_dict, error_to_dict

JobFn = Callable[[dict[str, Any]], dict[str, Any]]


def peak_rss_mb() -> float:
    """This process's own peak RSS (``VmHWM``). ``ru_maxrss`` survives exec and can report the parent's."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def reset_peak_rss() -> None:
    """Reset ``VmHWM`` to the current RSS (Linux ``clear_refs`` 5), so a later peak is the extra of one phase."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def run_worker(module: str, job: dict[str, Any], *, log_path: Path | None = None,
               on_progress: Callable[[str], None] | None = None, timeout: float | None = None) -> dict[str, Any]:
    """Run ``python -m module JOB.json``; return its RESULT, or raise its error in this process."""
    with tempfile.TemporaryDirectory(prefix="sfr-export-job-") as tmp:
        job_path = Path(tmp) / "job.json"
        job_path.write_text(json.dumps(job, default=str), encoding="utf-8")
        log = Path(log_path) if log_path else Path(tmp) / "worker.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        result, error, rc = _stream(module, job_path, log, on_progress, timeout)
        if error is not None:
            raise error_from_dict(error, log_hint=str(log_path) if log_path else None)
        if rc != 0 or result is None:
            tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-1:] or ["no output"]
            where = f" (full log: {log_path})" if log_path else ""
            raise WorkerError(f"{module} exited with code {rc}: {tail[0][:300]}{where}")
        return result


def _stream(module: str, job_path: Path, log: Path, on_progress: Callable[[str], None] | None,
            timeout: float | None) -> tuple[dict[str, Any] | None, dict[str, Any] | None, int]:
    result = error = None
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log, "w", encoding="utf-8") as logf:
        proc = subprocess.Popen([sys.executable, "-m", module, str(job_path)], stdout=subprocess.PIPE,
                                stderr=logf, text=True, env=env)
        assert proc.stdout is not None
        for line in proc.stdout:
            kind, _, rest = line.rstrip("\n").partition(" ")
            if kind == "PROGRESS" and on_progress:
                on_progress(rest)
            elif kind == "RESULT":
                result = json.loads(rest)
            elif kind == "ERROR":
                error = json.loads(rest)
            elif kind != "PROGRESS":
                logf.write(line)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise WorkerError(f"{module} timed out after {timeout:.0f} s") from None
    return result, error, rc


def worker_main(fn: JobFn) -> None:
    """Entry point of a ``python -m`` worker: read the job, run ``fn``, print RESULT or ERROR."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    job = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
    try:
        result = fn(job)
    except SfrExportError as exc:
        print("ERROR " + json.dumps(error_to_dict(exc), default=str), flush=True)
        raise SystemExit(3) from exc
    result["worker_peak_rss_mb"] = peak_rss_mb()
    print("RESULT " + json.dumps(result, default=str), flush=True)


def progress(msg: str) -> None:
    """Called inside a worker: report a progress line to the parent."""
    print(f"PROGRESS {msg}", flush=True)
