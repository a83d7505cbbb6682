"""The PyTorch reference runner: the backbone + ``sfr_export.pooling`` (the same code the export traces)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from ..spec import ModelSpec
from .runner import Runner


class TorchRunner(Runner):
    name = "torch"

    def __init__(self, model_dir: Path, spec: ModelSpec, *, dtype: str = "float32", device: str = "cpu",
                 model: Any = None, trust_remote_code: bool = False):
        super().__init__()
        self.model_dir = Path(model_dir)
        self.spec = spec
        self.dtype = dtype
        self.device = device
        self._model = model
        self._trust = trust_remote_code
        self._lock = threading.Lock()

    def activate_impl(self) -> None:
        if self._model is None:
            from ..models import load_backbone

            self._model = load_backbone(self.model_dir, dtype=self.dtype, device=self.device, trust_remote_code=self._trust)

    def deactivate_impl(self) -> None:
        self._model = None

    @property
    def model(self) -> Any:
        return self._model

    def infer_impl(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        import torch

        from ..pooling import pool_and_normalize

        ids = torch.from_numpy(np.ascontiguousarray(input_ids, dtype=np.int64)).to(self.device)
        mask = torch.from_numpy(np.ascontiguousarray(attention_mask, dtype=np.int64)).to(self.device)
        with torch.inference_mode():
            hidden = self._model(input_ids=ids, attention_mask=mask).last_hidden_state
            if self._fused_pooling():
                from ..kernels import last_token_l2  # Triton: fused last-token gather + L2, fp32 accumulation

                out = last_token_l2(hidden, mask, normalize=self.spec.normalize)
            else:
                out = pool_and_normalize(hidden, mask, self.spec.pooling, self.spec.normalize)
        return out.float().cpu().numpy()

    def _fused_pooling(self) -> bool:
        """Last-token pooling on CUDA with triton installed: use the fused kernel, else sfr_export.pooling."""
        from ..pooling import PoolingMode

        if self.spec.pooling is not PoolingMode.LASTTOKEN or not str(self.device).startswith("cuda"):
            return False
        from .._optional import available

        return available("triton")

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "device": self.device, "dtype": self.dtype, "model_dir": str(self.model_dir)}
