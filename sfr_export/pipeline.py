"""``sfr-export build``: run the pipeline's stages in order into one output dir, resuming what is up to date."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .artifact import StageRecord, writer_lock
from .models import ResolvedModel
from .artifact import Precision
from .stages.export import ExportConfig, run_export

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuildConfig:
    precision: Precision = Precision.FP32
    force: bool = False
    verify: bool = True
    export: ExportConfig = field(default_factory=ExportConfig)
    calibrate: Any = None  # stages.calibrate.CalibrateConfig for --precision int8 (None: defaults)


def build(root: Path, model: ResolvedModel, config: BuildConfig,
          on_progress: Callable[[str, str], None] | None = None) -> list[StageRecord]:
    """Run every stage the requested precision needs, holding the output dir's writer lock (a second writer is
    refused with ``LockedError`` naming this process). Returns the stage records in order."""
    with writer_lock(root):
        return _build(root, model, config, on_progress)


def _build(root: Path, model: ResolvedModel, config: BuildConfig,
           on_progress: Callable[[str, str], None] | None) -> list[StageRecord]:
    def stage_progress(stage: str) -> Callable[[str], None] | None:
        return (lambda msg: on_progress(stage, msg)) if on_progress else None

    records: list[StageRecord] = []
    # fp32 ONNX is always built: it is the fp32 artifact, the source of int8 calibration, and fp16's fallback.
    records.append(run_export(root, model, ExportConfig(precision=Precision.FP32, opset=config.export.opset,
                                                        validate=config.export.validate, low_memory=config.export.low_memory),
                              force=config.force, on_progress=stage_progress("export:fp32")))
    if config.precision is Precision.FP16:
        records.append(run_export(root, model, ExportConfig(precision=Precision.FP16, opset=config.export.opset,
                                                            validate=config.export.validate, low_memory=config.export.low_memory),
                                  force=config.force, on_progress=stage_progress("export:fp16")))
    if config.precision is Precision.INT8:
        from .stages.calibrate import CalibrateConfig, run_calibrate

        records += run_calibrate(root, config.calibrate or CalibrateConfig(), force=config.force,
                                 on_progress=stage_progress("calibrate"))
    if config.precision in (Precision.FP16, Precision.INT8):
        # TensorRT engine (+ the Q/DQ conformance check for int8); recorded as "skipped" without TensorRT/GPU.
        from .stages.engine import EngineConfig, run_engine

        records.append(run_engine(root, EngineConfig.for_spec(model.spec, precision=config.precision),
                                  force=config.force, on_progress=stage_progress("engine")))
    if config.verify:
        # Quick, time-boxed fidelity check of every variant built; a failing gate raises FidelityGateError (exit 1).
        from .stages.verify import VerifyConfig, run_verify

        records.append(run_verify(root, VerifyConfig.for_build(), on_progress=stage_progress("verify")).record)
    return records


def stage_summary(rec: StageRecord) -> dict[str, Any]:
    """The headline of a stage record for the CLI: status, reason, artifacts and its key fidelity figure."""
    out: dict[str, Any] = {"stage": rec.name, "status": rec.status}
    if rec.reason:
        out["reason"] = rec.reason
    out["artifacts"] = [a.path for a in rec.artifacts]
    fig = rec.figures
    if "validation" in fig:  # export: ONNX vs PyTorch right after export
        out["min_cosine_vs_torch"] = fig["validation"].get("min_cosine")
    if "fidelity" in fig:  # calibrate: ORT int8 vs torch fp32 at build time
        out["fidelity"] = {k: fig["fidelity"].get(k) for k in ("cos_mean", "cos_p1", "spearman_delta", "spearman_expected", "met")}
    if "gate" in fig:  # verify
        out["gate"] = fig["gate"]
    return out
