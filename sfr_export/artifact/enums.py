"""The names an output dir is made of: precisions, ONNX variants, stages and their statuses.

Each is parsed once, where it enters (CLI option, job file, manifest JSON), and passed on as the Enum.
"""

from __future__ import annotations

from ..choice import Choice


class Precision(Choice):
    """What ``build --precision`` asks for; each precision yields one or more variants."""

    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"


class Variant(Choice):
    """One ONNX model of an output dir, under ``onnx/<variant>/``."""

    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"  # explicit Q/DQ, TensorRT 11's form
    INT8_CPU = "int8-cpu"  # ONNX Runtime CPU int8 contrib ops

    @property
    def precision(self) -> Precision:
        return Precision.INT8 if self in (Variant.INT8, Variant.INT8_CPU) else Precision(self.value)

    @property
    def stage_name(self) -> str:
        """The manifest key of the stage that writes this variant."""
        kind = StageKind.CALIBRATE if self.precision is Precision.INT8 else StageKind.EXPORT
        return f"{kind.value}:{self.value}"


class StageKind(Choice, label="stage"):
    EXPORT = "export"
    CALIBRATE = "calibrate"
    ENGINE = "engine"
    VERIFY = "verify"


class Status(Choice):
    OK = "ok"
    SKIPPED = "skipped"
    FAILED_TARGETS = "failed-targets"  # built, but short of the fidelity targets: kept, never chosen by default
    FAILED = "failed"  # the run failed; recorded beside the last good record, never over it


class Backend(Choice):
    AUTO = "auto"
    ONNXRUNTIME = "onnxruntime"
    TORCH = "torch"
    TENSORRT = "tensorrt"


ENGINE_SOURCE = {Precision.FP32: Variant.FP32, Precision.FP16: Variant.FP16, Precision.INT8: Variant.INT8}
