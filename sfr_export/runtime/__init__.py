"""Runtime: the ``Embedder`` API over runner backends (torch, onnxruntime, tensorrt)."""

from .embedder import Embedder, embedder_for_model, onnx_variants
from .runner import Runner

__all__ = ["Embedder", "Runner", "embedder_for_model", "onnx_variants"]
