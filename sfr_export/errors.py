"""One error hierarchy. The CLI prints any ``SfrExportError`` as one line and exits with its ``exit_code``.

Exit codes (also in the README's "Errors" section):

| code | meaning |
|---|---|
| 0 | success |
| 1 | a fidelity gate failed (the report is written; nothing else is wrong) |
| 2 | a usage error or bad input: an option, a file, a text, a config |
| 3 | the artifact is missing, damaged, or of another model |
| 4 | the environment lacks something: a package, a backend, a GPU, TensorRT |
| 5 | the output dir is locked by another sfr-export process |
| 6 | an operating-system error on a path (permission, not a directory, disk full) |
| 70 | an internal error (a bug): one line; ``SFR_EXPORT_DEBUG=1`` shows the traceback |
| 130 | interrupted |
"""

from __future__ import annotations

import importlib
from typing import Any

_REGISTRY: dict[str, type["SfrExportError"]] = {}


class SfrExportError(Exception):
    """Base class of every error this package raises on purpose."""

    exit_code = 2

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        _REGISTRY[cls.__name__] = cls


class UserInputError(SfrExportError):
    """Bad arguments or bad input data (empty text, unknown precision, thresholds out of range)."""


class ModelLoadError(SfrExportError):
    """A model could not be found or loaded (missing dir, hub offline, unknown demo name, no safetensors)."""


class MissingDependencyError(SfrExportError):
    """An optional dependency is not installed; the message names the extra that provides it."""

    exit_code = 4


class ArtifactError(SfrExportError):
    """An artifact is missing, corrupt, truncated, fails its checksum or belongs to another model."""

    exit_code = 3


class ChecksumMismatchError(ArtifactError):
    """A file's sha256 differs from the one recorded in the manifest."""


class LockedError(SfrExportError):
    """Another process holds the output dir's writer lock; the message names its PID."""

    exit_code = 5


class PathError(SfrExportError):
    """An operating-system error on a user-given path (permission, not a directory, disk full)."""

    exit_code = 6


class ExportValidationError(SfrExportError):
    """The exported graph disagrees with PyTorch beyond the tolerance; names the worst input."""

    def __init__(self, message: str, *, worst_text: str | None = None, min_cosine: float | None = None):
        super().__init__(message)
        self.worst_text = worst_text
        self.min_cosine = min_cosine


class BackendUnavailableError(SfrExportError):
    """A requested backend or execution provider is not available or not really active."""

    exit_code = 4


class CalibrationError(SfrExportError):
    """Calibration or quantization could not produce a valid artifact."""


class FidelityGateError(SfrExportError):
    """A fidelity threshold failed; the message names the worst task and candidate."""

    exit_code = 1


class EngineError(SfrExportError):
    """A TensorRT engine could not be built, loaded, or does not match this TRT version / GPU."""

    exit_code = 4


class TrainingError(SfrExportError):
    """Fine-tuning input or state is invalid (bad JSONL, empty task, checkpoint of another model)."""


class WorkerError(SfrExportError):
    """A stage subprocess failed without reporting one of our errors (crash, OOM kill); names its log."""

    exit_code = 70


def error_to_dict(exc: SfrExportError) -> dict[str, Any]:
    """What a worker sends back: class, module, message and the JSON-able fields of the error."""
    fields = {k: v for k, v in vars(exc).items() if isinstance(v, (str, int, float, bool, type(None), list, dict))}
    return {"type": type(exc).__name__, "module": type(exc).__module__, "message": str(exc), "fields": fields}


def error_from_dict(d: dict[str, Any], *, log_hint: str | None = None) -> SfrExportError:
    """The same error class with the same fields, in the parent process."""
    cls = _REGISTRY.get(str(d.get("type")))
    if cls is None and d.get("module", "").startswith("sfr_export."):
        importlib.import_module(d["module"])  # registers the classes it defines
        cls = _REGISTRY.get(str(d.get("type")))
    if cls is None:
        hint = f" (log: {log_hint})" if log_hint else ""
        return WorkerError(f"{d.get('type')}: {d.get('message')}{hint}")
    exc = cls.__new__(cls)
    Exception.__init__(exc, d.get("message", ""))
    vars(exc).update(d.get("fields", {}))
    return exc
