"""OpenAI-compatible embedding server: dynamic batching, limits, Prometheus metrics (the ``[serve]`` extra).

Importing this package pulls in neither FastAPI nor uvicorn; ``create_app`` / ``run_server`` import them.
"""

from .app import EmbedderOptions, ServeConfig, create_app, run_server
from .batching import BatchingConfig, BatchQueue
from .protocol import ApiError, Limits

__all__ = ["ApiError", "BatchQueue", "BatchingConfig", "EmbedderOptions", "Limits", "ServeConfig", "create_app",
           "run_server"]
