"""Commands: ``engine`` (TensorRT 11 engine from an output dir) and ``check-qdq`` (TensorRT Q/DQ conformance)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..artifact import Precision
from ._ui import note, print_json, run_with_spinner


def engine(
    directory: Path = typer.Argument(..., help="An sfr-export output dir (with the fp16 or int8 ONNX)."),
    precision: Precision = typer.Option(Precision.FP16, "--precision", "-p", case_sensitive=False,
                                        help="fp16 (from export:fp16) | int8 (from calibrate:int8) | fp32"),
    batch: Optional[str] = typer.Option(None, help="Batch profile MIN,OPT,MAX (default 1,8,32)."),
    seq: Optional[str] = typer.Option(None, help="Sequence profile MIN,OPT,MAX (default 1,min(128,max),max_length)."),
    workspace_gib: float = typer.Option(8.0, help="Builder workspace limit in GiB."),
    opt_level: int = typer.Option(3, help="Builder optimization level 0..5."),
    timing_cache: Optional[Path] = typer.Option(None, help="Persistent timing cache (default DIR/engine/timing.cache)."),
    version_compatible: bool = typer.Option(False, help="Build a version-compatible plan (later 11.x runtimes)."),
    exclude_lean_runtime: bool = typer.Option(False, help="With --version-compatible: leave the lean runtime out of the plan."),
    force: bool = typer.Option(False, help="Rebuild even if the engine is up to date."),
) -> None:
    """Build a TensorRT engine; without TensorRT or a GPU, record the stage as skipped (with the reason)."""
    from ..artifact import load_spec
    from ..stages.common import writer_lock
    from ..stages.engine import EngineConfig, run_engine

    cfg = EngineConfig.for_spec(load_spec(directory), precision=precision, batch=batch, seq=seq,
                                workspace_gib=workspace_gib, opt_level=opt_level,
                                timing_cache=str(timing_cache) if timing_cache else None,
                                version_compatible=version_compatible, exclude_lean_runtime=exclude_lean_runtime)
    with writer_lock(directory):
        rec = run_with_spinner("engine", lambda say: run_engine(directory, cfg, force=force, on_progress=say))
    # a skip is said once, by the stage's own warning (as in `build`); the JSON below carries the reason too
    print_json({"stage": rec.name, "status": rec.status, "reason": rec.reason,
                "artifacts": [a.path for a in rec.artifacts], "batch_profile": cfg.batch.as_list(),
                "seq_profile": cfg.seq.as_list(), "qdq_check_passed": rec.figures.get("qdq_check", {}).get("passed"),
                "build_seconds": rec.figures.get("build_seconds")})


def check_qdq(
    model: Path = typer.Argument(..., help="An int8 ONNX model (external data next to it is read as needed)."),
    allow_per_tensor_weights: bool = typer.Option(False, help="Accept per-tensor weight scales."),
) -> None:
    """Check an int8 ONNX against TensorRT's explicit-quantization rules; exit 2 on violations."""
    from ..errors import CalibrationError
    from ..tensorrt.qdq_check import QdqCheckConfig, check_qdq as run_check

    report = run_check(model, QdqCheckConfig(require_per_channel_weights=not allow_per_tensor_weights))
    print_json(report.to_dict())
    if not report:  # one error line and a non-zero exit, as for every SfrExportError
        raise CalibrationError(f"Q/DQ check failed: {report.summary()}")
    note(f"Q/DQ check passed: {report.summary()}", style="green")


COMMANDS = {"engine": engine, "check-qdq": check_qdq}
