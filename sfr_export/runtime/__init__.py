"""Runtime: the ``Embedder`` API over runner backends (torch, onnxruntime, tensorrt). Stands on ``artifact`` only."""

from .embedder import Embedder, embedder_for_model
from .runner import Runner

__all__ = ["Embedder", "Runner", "embedder_for_model"]
