"""The calibrate stage's named options, each parsed once into its Enum (``sfr_export.choice``)."""

from __future__ import annotations

from ..choice import Choice


class CalibrationMethod(Choice, label="calibration method"):
    """How a per-tensor activation range is chosen from the calibration statistics."""

    MINMAX = "minmax"
    PERCENTILE = "percentile"
    ENTROPY = "entropy"

    @property
    def min_samples(self) -> int:
        """Calibration texts the method needs: a histogram's tail needs more texts than a max."""
        return {"minmax": 8, "percentile": 32, "entropy": 64}[self.value]


class RotationMode(Choice, label="rotation mode"):
    """``--rotation``: auto (the Q/DQ form of last-token models), on (also the CPU form's rotated candidates), off."""

    AUTO = "auto"
    ON = "on"
    OFF = "off"


class ReferenceDtype(Choice, label="reference dtype"):
    """The torch model used for calibration and as the reference: auto picks bfloat16 above a size."""

    AUTO = "auto"
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"


class WeightRounding(Choice, label="weight rounding"):
    """``--weight-rounding`` of the Q/DQ form and the CPU form's folded candidate: gptq (error-compensated on the
    calibration texts' inputs, sfr_export.quant.gptq) or nearest."""

    GPTQ = "gptq"
    NEAREST = "nearest"
