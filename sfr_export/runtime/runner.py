"""The runner interface every backend implements (Polygraphy style: activate, infer, deactivate)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np


class Runner(ABC):
    """A backend that maps padded token ids to sentence embeddings.

    ``infer`` takes int64 ``input_ids`` and ``attention_mask`` of shape [batch, seq] and returns float32
    [batch, dim]. A runner must be activated before ``infer``; use it as a context manager.
    """

    name: str = "runner"

    def __init__(self) -> None:
        self.is_active = False

    def activate(self) -> None:
        if not self.is_active:
            self.activate_impl()
            self.is_active = True

    def deactivate(self) -> None:
        if self.is_active:
            self.deactivate_impl()
            self.is_active = False

    def infer(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        if not self.is_active:
            raise RuntimeError(f"runner {self.name} is not active: call activate() or use it as a context manager")
        return self.infer_impl(input_ids, attention_mask)

    def describe(self) -> dict[str, Any]:
        """What this runner really runs on (providers, device, dtype), for logs, reports and the manifest."""
        return {"name": self.name}

    @abstractmethod
    def activate_impl(self) -> None: ...

    @abstractmethod
    def infer_impl(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray: ...

    def deactivate_impl(self) -> None:
        return None

    def __enter__(self) -> "Runner":
        self.activate()
        return self

    def __exit__(self, *exc: object) -> None:
        self.deactivate()
