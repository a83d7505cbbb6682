"""ONNX Runtime runner. Refuses to run on a provider other than the ones asked for (no silent CPU fallback)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ArtifactError, BackendUnavailableError
from .ort_int8 import exact_integer_form, exact_session_config, u8s8_saturates
from .runner import Runner

log = logging.getLogger(__name__)


def check_providers(requested: Sequence[str], available: Sequence[str], active: Sequence[str], *,
                    allow_fallback: bool = False) -> None:
    """Raise if a requested execution provider is not installed or not really active in the session.

    ONNX Runtime silently drops a provider it cannot initialise and runs on CPU; we make that an error unless the
    caller allowed it.
    """
    missing = [p for p in requested if p not in available]
    if missing and not allow_fallback:
        raise BackendUnavailableError(
            f"execution provider(s) {', '.join(missing)} not available in this onnxruntime build "
            f"(available: {', '.join(available)}); install the [gpu] extra (onnxruntime-gpu) instead of onnxruntime"
        )
    inactive = [p for p in requested if p in available and p not in active]
    if inactive and not allow_fallback:
        raise BackendUnavailableError(
            f"execution provider(s) {', '.join(inactive)} were requested but the session runs on {', '.join(active)}: "
            "ONNX Runtime fell back silently (driver/CUDA libraries missing?); pass allow_fallback=True to accept"
        )


class OrtRunner(Runner):
    name = "onnxruntime"

    def __init__(self, onnx_path: Path, *, providers: Sequence[str | tuple[str, dict[str, Any]]] = ("CPUExecutionProvider",),
                 session_config: dict[str, str] | None = None, intra_op_threads: int | None = None,
                 allow_fallback: bool = False):
        super().__init__()
        self.onnx_path = Path(onnx_path)
        self.providers = list(providers)
        self.session_config = dict(session_config or {})
        self.intra_op_threads = intra_op_threads
        self.allow_fallback = allow_fallback
        self.session: Any = None
        self.graph_padding = "any"  # "right": the graph is causal-only (sfr_export.stages.export_graph); others are re-padded

    def _saturates(self) -> bool:
        """ORT's u8 x s8 GEMM saturates on this CPU's provider (only CPU kernels do; ort_int8)."""
        return self._provider_names() == ["CPUExecutionProvider"] and u8s8_saturates()

    def _provider_names(self) -> list[str]:
        return [p if isinstance(p, str) else p[0] for p in self.providers]

    def activate_impl(self) -> None:
        import onnxruntime as ort

        if not self.onnx_path.is_file():
            raise ArtifactError(f"ONNX model {self.onnx_path} is missing")
        opts = ort.SessionOptions()
        for k, v in exact_session_config(self.session_config, self._saturates()).items():
            opts.add_session_config_entry(k, str(v))
        if self.intra_op_threads:
            opts.intra_op_num_threads = self.intra_op_threads
        opts.log_severity_level = 3
        try:
            with exact_integer_form(self.onnx_path, saturates=self._saturates()) as path:
                self.session = ort.InferenceSession(str(path), sess_options=opts, providers=self.providers)
        except Exception as exc:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...)
            if type(exc).__module__.startswith("onnxruntime"):
                raise ArtifactError(f"ONNX Runtime cannot load {self.onnx_path}: corrupt or truncated file? "
                                    f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from exc
            raise
        check_providers(self._provider_names(), ort.get_available_providers(), self.session.get_providers(),
                        allow_fallback=self.allow_fallback)
        meta = self.session.get_modelmeta().custom_metadata_map
        self.graph_padding = meta.get("sfr_export.padding_side", "any")
        names = [i.name for i in self.session.get_inputs()]
        if names[:2] != ["input_ids", "attention_mask"]:
            raise ArtifactError(f"{self.onnx_path} inputs are {names}, expected input_ids, attention_mask")

    def deactivate_impl(self) -> None:
        self.session = None

    def infer_impl(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        if self.graph_padding == "right":
            from ..tokenization import right_align

            input_ids, attention_mask = right_align(input_ids, attention_mask)
        out = self.session.run(["sentence_embedding"], {"input_ids": np.ascontiguousarray(input_ids, dtype=np.int64),
                                                        "attention_mask": np.ascontiguousarray(attention_mask, dtype=np.int64)})[0]
        return np.asarray(out, dtype=np.float32)

    def describe(self) -> dict[str, Any]:
        active = self.session.get_providers() if self.session is not None else []
        return {"name": self.name, "model": str(self.onnx_path), "providers": active, "session_config": self.session_config}
