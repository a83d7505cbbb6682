"""Helpers shared by stages: precision names, artifact-dir preparation, subprocess workers with progress."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Any

from ..errors import SfrExportError, UserInputError
from ..manifest import Manifest, atomic_dir, atomic_write_text
from ..models import ResolvedModel, load_tokenizer

log = logging.getLogger(__name__)


class Precision(str, Enum):
    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"

    @classmethod
    def parse(cls, value: str) -> "Precision":
        try:
            return cls(str(value).lower())
        except ValueError:
            raise UserInputError(f"unknown precision '{value}' (expected fp32, fp16 or int8)") from None


def prepare_output(root: Path, model: ResolvedModel, *, dtype: str = "float32") -> Manifest:
    """Open the output dir's manifest for ``model`` and write ``spec.json`` and ``tokenizer/`` (first stage only)."""
    from ..runtime.embedder import SPEC_FILE, TOKENIZER_DIR

    manifest = Manifest.open_for_model(root, model.manifest_entry())
    spec_json = json.dumps(model.spec.to_dict(), indent=2)
    spec_path = Path(root) / SPEC_FILE
    if not spec_path.is_file() or spec_path.read_text(encoding="utf-8") != spec_json:
        atomic_write_text(spec_path, spec_json)
    if not (Path(root) / TOKENIZER_DIR).is_dir():
        tok = load_tokenizer(model.local_dir)
        with atomic_dir(Path(root) / TOKENIZER_DIR) as tmp:
            tok.save_pretrained(str(tmp))
    manifest.set_spec(model.spec.to_dict())
    manifest.data["reference_dtype"] = dtype
    manifest.save()
    return manifest


class WorkerError(SfrExportError):
    """A stage subprocess failed; carries the error line it reported."""


def run_worker(module: str, job: dict[str, Any], *, log_path: Path, on_progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run ``python -m module JOB.json`` in a subprocess (so its memory comes back), streaming progress lines.

    The worker prints ``PROGRESS <text>`` lines on stdout and finally ``RESULT <json>``; a failure is reported as
    ``ERROR <type> <message>`` and re-raised here as the same error class when it is one of ours.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    job_path = log_path.with_suffix(".job.json")
    job_path.write_text(json.dumps(job, default=str))
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    result: dict[str, Any] | None = None
    error: tuple[str, str] | None = None
    with open(log_path, "w", encoding="utf-8") as logf:
        proc = subprocess.Popen([sys.executable, "-m", module, str(job_path)], stdout=subprocess.PIPE,
                                stderr=logf, text=True, env=env)
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            if line.startswith("PROGRESS "):
                if on_progress:
                    on_progress(line[9:])
            elif line.startswith("RESULT "):
                result = json.loads(line[7:])
            elif line.startswith("ERROR "):
                kind, _, msg = line[6:].partition(" ")
                error = (kind, msg)
            else:
                logf.write(line + "\n")
        rc = proc.wait()
    job_path.unlink(missing_ok=True)
    if error is not None:
        from .. import errors as errmod

        cls = getattr(errmod, error[0], None)
        if isinstance(cls, type) and issubclass(cls, SfrExportError):
            raise cls(error[1])
        raise WorkerError(f"{error[0]}: {error[1]} (log: {log_path})")
    if rc != 0 or result is None:
        tail = log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-1:] or ["no output"]
        raise WorkerError(f"{module} exited with code {rc}: {tail[0][:300]} (full log: {log_path})")
    return result


def peak_rss_mb() -> float:
    """This process's own peak RSS. ``VmHWM`` is per process; ``ru_maxrss`` survives exec and can report the parent's."""
    import resource

    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def worker_main(fn: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """Entry point for ``python -m`` stage workers: read the job, run ``fn``, print RESULT or ERROR."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    job = json.loads(Path(sys.argv[1]).read_text())
    try:
        result = fn(job)
    except SfrExportError as exc:
        print(f"ERROR {type(exc).__name__} {str(exc).replace(chr(10), ' ')}", flush=True)
        raise SystemExit(3) from exc
    result["worker_peak_rss_mb"] = peak_rss_mb()
    print("RESULT " + json.dumps(result, default=str), flush=True)


def progress(msg: str) -> None:
    """Called inside a worker: report a progress line to the parent."""
    print(f"PROGRESS {msg}", flush=True)
