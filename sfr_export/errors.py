"""One error hierarchy. The CLI prints any ``SfrExportError`` as one line and exits non-zero."""

from __future__ import annotations


class SfrExportError(Exception):
    """Base class of every error this package raises on purpose."""

    exit_code = 2


class UserInputError(SfrExportError):
    """Bad arguments or bad input data (empty text, unknown precision, thresholds out of range)."""


class ModelLoadError(SfrExportError):
    """A model could not be found or loaded (missing dir, hub offline, unknown demo name, no safetensors)."""


class MissingDependencyError(SfrExportError):
    """An optional dependency is not installed; the message names the extra that provides it."""


class ArtifactError(SfrExportError):
    """An artifact is missing, corrupt, truncated, fails its checksum or belongs to another model."""


class ChecksumMismatchError(ArtifactError):
    """A file's sha256 differs from the one recorded in the manifest."""


class ExportValidationError(SfrExportError):
    """The exported graph disagrees with PyTorch beyond the tolerance; names the worst input."""

    def __init__(self, message: str, *, worst_text: str | None = None, min_cosine: float | None = None):
        super().__init__(message)
        self.worst_text = worst_text
        self.min_cosine = min_cosine


class BackendUnavailableError(SfrExportError):
    """A requested backend or execution provider is not available or not really active."""


class CalibrationError(SfrExportError):
    """Calibration or quantization could not produce a valid artifact."""


class FidelityGateError(SfrExportError):
    """A fidelity threshold failed; the message names the worst task and candidate."""

    exit_code = 1


class EngineError(SfrExportError):
    """A TensorRT engine could not be built, loaded, or does not match this TRT version / GPU."""


class TrainingError(SfrExportError):
    """Fine-tuning input or state is invalid (bad JSONL, empty task, checkpoint of another model)."""
