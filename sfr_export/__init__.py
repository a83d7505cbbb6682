"""sfr-export: decoder-LLM text-embedding models to faithful ONNX / INT8 / TensorRT artifacts.

Importing this package pulls no torch, onnxruntime or tensorrt; the names below load lazily.
"""

from __future__ import annotations

from typing import Any

from .errors import SfrExportError

__version__ = "0.1.0"
__all__ = ["Embedder", "ModelSpec", "SfrExportError", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "Embedder":
        from .runtime.embedder import Embedder

        return Embedder
    if name == "ModelSpec":
        from .spec import ModelSpec

        return ModelSpec
    raise AttributeError(name)
