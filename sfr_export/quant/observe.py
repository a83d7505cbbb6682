"""Observe linear-layer inputs of a torch backbone on calibration batches (padding excluded).

One pass collects, per ``nn.Linear`` input: the per-channel abs-max (SmoothQuant), a per-tensor range by the chosen
method (minmax | percentile | entropy, the latter two through onnxruntime's ``HistogramCollector``), and a small
seeded subsample of token rows (per-group alpha search). Rows come only from attended positions, so batches may have
any shape (the 'same-shape batches' trap of ORT's calibrators does not apply).
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import CalibrationError, UserInputError
from .options import CalibrationMethod

log = logging.getLogger(__name__)

QMAX = 127.0


@dataclass(frozen=True)
class ObserveConfig:
    method: CalibrationMethod = CalibrationMethod.MINMAX
    percentile: float = 99.999
    num_bins: int = 2048
    num_quantized_bins: int = 128  # ORT's default; configurable here (the 'hard-wired 128 bins' trap)
    keep_rows: int = 256
    # leading positions left out of every statistic: the W8A8 form keeps them float (a causal decoder's first token
    # carries massive activations; with right padding position 0 is every text's first token)
    skip_prefix: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "method", CalibrationMethod.parse(self.method))
        if not 50.0 < self.percentile <= 100.0:
            raise UserInputError(f"percentile must be in (50, 100], got {self.percentile}")


@dataclass
class LinearStats:
    channel_absmax: np.ndarray  # [in_features]
    absmax: float = 0.0
    rows: list[np.ndarray] = field(default_factory=list)
    n_rows: int = 0

    def sample(self) -> np.ndarray:
        return np.concatenate(self.rows, axis=0) if self.rows else np.zeros((0, self.channel_absmax.shape[0]), np.float32)


def linear_modules(model: Any) -> dict[str, Any]:
    import torch

    return {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    with contextlib.redirect_stdout(io.StringIO()):  # HistogramCollector prints progress lines
        yield


class _Recorder:
    """Forward pre-hooks that record each linear's input: channel abs-max, a row sample, and the histogram."""

    def __init__(self, config: ObserveConfig, n_batches: int, seed: int):
        self.config = config
        self.stats: dict[str, LinearStats] = {}
        self.collector = _histogram_collector(config)
        self.rng = np.random.default_rng(seed)
        self.mask: Any = None
        self.per_batch_rows = max(1, config.keep_rows // max(1, n_batches))

    def _rows(self, x: Any) -> Any:
        """The input's real (unmasked) token rows, past ``skip_prefix``, as float32."""
        m = self.mask
        if self.config.skip_prefix and x.dim() == 3 and x.shape[:2] == m.shape:
            x, m = x[:, self.config.skip_prefix:], m[:, self.config.skip_prefix:]
        return (x[m.bool()] if x.dim() == 3 and x.shape[:2] == m.shape else x.reshape(-1, x.shape[-1])).float()

    def hook(self, name: str) -> Any:
        import torch

        def fn(_mod: Any, args: tuple[Any, ...]) -> None:
            x2 = self._rows(args[0].detach())
            if x2.shape[0] == 0:
                return
            cam = x2.abs().amax(dim=0).cpu().numpy()
            st = self.stats.get(name)
            if st is None:
                st = self.stats[name] = LinearStats(channel_absmax=cam)
            else:
                np.maximum(st.channel_absmax, cam, out=st.channel_absmax)
            st.absmax = max(st.absmax, float(cam.max()))
            n_rows = x2.shape[0]
            take = np.sort(self.rng.choice(n_rows, size=min(self.per_batch_rows, n_rows), replace=False))
            st.rows.append(x2[torch.from_numpy(take)].cpu().numpy().astype(np.float32))  # only sampled rows leave torch
            st.n_rows += n_rows
            if self.collector is not None:
                with _quiet():
                    self.collector.collect({name: x2.cpu().numpy().reshape(-1)})
        return fn

    def ranges(self) -> dict[str, float]:
        """Per-tensor activation abs-max thresholds by ``config.method``; refuses a non-finite one."""
        ranges = {n: s.absmax for n, s in self.stats.items()}
        if self.collector is not None:
            with _quiet():
                res = self.collector.compute_collection_result()
            for n, v in res.items():
                ranges[n] = float(max(abs(float(v[0])), abs(float(v[1]))))
        for n, r in ranges.items():
            if not np.isfinite(r):
                raise CalibrationError(f"activation range of {n} is not finite ({r}): the model produced NaN/inf on "
                                       "calibration data")
        return ranges


def _histogram_collector(config: ObserveConfig) -> Any:
    if config.method is CalibrationMethod.MINMAX:
        return None
    from onnxruntime.quantization.calibrate import HistogramCollector

    return HistogramCollector(method=config.method.value, symmetric=True, num_bins=config.num_bins,
                              num_quantized_bins=config.num_quantized_bins, percentile=config.percentile,
                              scenario="same")


def observe(model: Any, batches: Sequence[tuple[np.ndarray, np.ndarray]], names: Sequence[str],
            config: ObserveConfig, *, seed: int = 0) -> tuple[dict[str, LinearStats], dict[str, float]]:
    """Run ``model`` on ``batches`` (input_ids, attention_mask) and return per-linear stats and per-tensor ranges
    (the activation abs-max threshold by ``config.method``), both keyed by module name."""
    import torch

    mods = linear_modules(model)
    missing = [n for n in names if n not in mods]
    if missing:
        raise CalibrationError(f"linear layers {missing[:3]} not found in the model")
    rec = _Recorder(config, len(batches), seed)
    handles = [mods[n].register_forward_pre_hook(rec.hook(n)) for n in names]
    try:
        with torch.inference_mode():
            for ids, mask in batches:
                t_ids = torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64))
                rec.mask = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.int64))
                model(input_ids=t_ids, attention_mask=rec.mask)
    finally:
        for h in handles:
            h.remove()
    return rec.stats, rec.ranges()


def act_scale(threshold: float) -> float:
    return max(float(threshold), 1e-8) / QMAX


def weight_scales(w: np.ndarray, axis: int) -> np.ndarray:
    """Symmetric per-channel scales of a weight along ``axis`` (the output channel)."""
    red = tuple(i for i in range(w.ndim) if i != axis)
    return np.maximum(np.abs(w).max(axis=red), 1e-12).astype(np.float32) / QMAX


def quantize_weight(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    s = weight_scales(w, axis)
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.clip(np.rint(w / s.reshape(shape)), -QMAX, QMAX).astype(np.int8)
    return q, s
