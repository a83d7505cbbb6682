"""TensorRT runner: deserialize a TensorRT 11 engine, check its sidecar, run it with torch CUDA tensors.

- The sidecar (TRT version, GPU, compute capability, profiles) is checked before deserializing: a mismatch is an
  ``EngineError`` that says to rebuild. A corrupt or truncated plan is an ``EngineError`` too.
- One execution context and one CUDA stream per thread (contexts are not thread-safe; the engine is shared).
- Inputs are fitted to the optimization profile: batches over the profile max are split, batches under the min are
  padded with copies of the first row (dropped again), sequences under the min are right-padded with mask 0, and a
  sequence over the profile max is refused (the engine cannot run it; rebuild with a larger ``--seq``).
- I/O are torch CUDA tensors whose addresses go to ``set_tensor_address``; inference is ``execute_async_v3``.
- ``tensorrt`` or the runtime-only ``tensorrt_lean`` package is enough to run a plan built by the same version;
  a version-compatible plan that embeds the lean runtime needs ``engine_host_code_allowed``.
"""

from __future__ import annotations

import importlib
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import EngineError, UserInputError
from ..artifact.enums import StageKind
from ..artifact.engine_format import EngineSidecar, ShapeRange, check_compatibility
from .runner import Runner

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------------------------
# Shape planning (pure; tested on CPU)
# ------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Chunk:
    start: int  # rows [start, stop) of the caller's batch
    stop: int
    pad_rows: int  # rows appended (copies of the chunk's first row) to reach the profile min batch
    seq: int  # sequence length sent to the engine (>= the input's, padded with mask 0)


def plan_chunks(batch: int, seq: int, batch_range: ShapeRange, seq_range: ShapeRange) -> list[Chunk]:
    """Split/pad a [batch, seq] request so that every engine call is inside the profile."""
    if batch < 1 or seq < 1:
        raise UserInputError(f"empty input: batch {batch}, sequence length {seq}")
    if seq > seq_range.max:
        raise UserInputError(f"sequence length {seq} exceeds the TensorRT engine's profile max {seq_range.max}: "
                             f"rebuild the engine with `sfr-export engine DIR --seq {seq_range.min},{seq_range.opt},{seq}` "
                             f"or lower the tokenizer's max length")
    run_seq = max(seq, seq_range.min)
    chunks = []
    for start in range(0, batch, batch_range.max):
        stop = min(batch, start + batch_range.max)
        chunks.append(Chunk(start, stop, max(0, batch_range.min - (stop - start)), run_seq))
    return chunks


def fit_chunk(input_ids: np.ndarray, attention_mask: np.ndarray, chunk: Chunk, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The padded [rows, chunk.seq] arrays of one chunk."""
    ids = input_ids[chunk.start:chunk.stop]
    mask = attention_mask[chunk.start:chunk.stop]
    if chunk.pad_rows:
        ids = np.concatenate([ids, np.repeat(ids[:1], chunk.pad_rows, axis=0)])
        mask = np.concatenate([mask, np.repeat(mask[:1], chunk.pad_rows, axis=0)])
    extra = chunk.seq - ids.shape[1]
    if extra > 0:  # right padding with mask 0: last-token pooling (argmax of mask * position) is unchanged
        ids = np.pad(ids, ((0, 0), (0, extra)), constant_values=pad_id)
        mask = np.pad(mask, ((0, 0), (0, extra)), constant_values=0)
    return np.ascontiguousarray(ids, dtype=np.int64), np.ascontiguousarray(mask, dtype=np.int64)


def import_tensorrt(prefer_lean: bool = False) -> Any:
    """``tensorrt`` (builder + runtime) or ``tensorrt_lean`` (runtime only)."""
    order = ("tensorrt_lean", "tensorrt") if prefer_lean else ("tensorrt", "tensorrt_lean")
    errors = []
    for name in order:
        try:
            return importlib.import_module(name)
        except ImportError as exc:
            errors.append(f"{name}: {exc}")
    from ..errors import MissingDependencyError

    raise MissingDependencyError("TensorRT is not installed (needed for the tensorrt backend): "
                                 "pip install 'sfr-export[gpu]' (or tensorrt-lean to run engines only); " + "; ".join(errors))


# ------------------------------------------------------------------------------------------------------------------
# The runner
# ------------------------------------------------------------------------------------------------------------------
class TensorRTRunner(Runner):
    name = "tensorrt"

    def __init__(self, engine_path: Path, sidecar: EngineSidecar, *, device: int = 0, prefer_lean: bool = False):
        super().__init__()
        self.engine_path = Path(engine_path)
        self.sidecar = sidecar
        self.device = device
        self.prefer_lean = prefer_lean or sidecar.lean_runtime_excluded
        self.batch_range = sidecar.batch_range()
        self.seq_range = sidecar.seq_range()
        self._trt: Any = None
        self._runtime: Any = None
        self._engine: Any = None
        self._local = threading.local()
        self._contexts: list[Any] = []
        self._lock = threading.Lock()

    @classmethod
    def from_manifest(cls, manifest: Any, *, verify: bool = True, device: int = 0) -> "TensorRTRunner":
        STAGE = StageKind.ENGINE.value

        rec = manifest.stage(STAGE)
        if rec is None or rec.status != "ok":
            why = f" ({rec.reason})" if rec is not None and rec.reason else ""
            raise EngineError(f"{manifest.root} has no built TensorRT engine{why}: run `sfr-export engine {manifest.root}` on a GPU machine")
        if verify:
            manifest.verify_stage(STAGE)  # size + sha256: catches truncated or replaced plans
        engine_path = manifest.artifact_path(STAGE, "engine")
        sidecar = EngineSidecar.load(manifest.artifact_path(STAGE, "engine-sidecar"))
        return cls(engine_path, sidecar, device=device)

    # ---- lifecycle -----------------------------------------------------------------------------------------
    def activate_impl(self) -> None:
        import torch

        trt = import_tensorrt(self.prefer_lean)
        if not torch.cuda.is_available():
            raise EngineError("the tensorrt backend needs a CUDA GPU; none is visible")
        torch.cuda.set_device(self.device)
        major, minor = torch.cuda.get_device_capability(self.device)
        for w in check_compatibility(self.sidecar, trt_version=str(trt.__version__),
                                     gpu_name=torch.cuda.get_device_name(self.device),
                                     compute_capability=f"{major}.{minor}"):
            log.warning("%s", w)
        data = self.engine_path.read_bytes() if self.engine_path.is_file() else b""
        if not data:
            raise EngineError(f"engine {self.engine_path} is missing or empty: rebuild with `sfr-export engine`")
        logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(logger)
        if self.sidecar.version_compatible and not self.sidecar.lean_runtime_excluded:
            runtime.engine_host_code_allowed = True  # the plan carries its own lean runtime; trust only our own plans
        engine = runtime.deserialize_cuda_engine(data)
        if engine is None:
            raise EngineError(f"TensorRT could not deserialize {self.engine_path} (corrupt, truncated, or built by "
                              "another TensorRT version/GPU): rebuild it with `sfr-export engine DIR`")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        expected = set(self.sidecar.inputs) | {self.sidecar.output}
        if set(names) != expected:
            raise EngineError(f"engine I/O tensors {names} differ from the sidecar's {sorted(expected)}: rebuild it")
        self._trt, self._runtime, self._engine = trt, runtime, engine

    def deactivate_impl(self) -> None:
        with self._lock:
            self._contexts.clear()
        self._local = threading.local()
        self._engine = None
        self._runtime = None

    # ---- per-thread context --------------------------------------------------------------------------------
    def _context(self) -> tuple[Any, Any]:
        ctx = getattr(self._local, "ctx", None)
        if ctx is None:
            import torch

            context = self._engine.create_execution_context()
            if context is None:
                raise EngineError("TensorRT could not create an execution context (out of GPU memory?)")
            stream = torch.cuda.Stream(device=self.device)
            ctx = (context, stream)
            self._local.ctx = ctx
            with self._lock:
                self._contexts.append(ctx)
        return ctx

    def _torch_dtype(self, name: str) -> Any:
        import torch

        trt = self._trt
        mapping = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.INT32: torch.int32,
                   trt.DataType.INT64: torch.int64, trt.DataType.BF16: torch.bfloat16}
        dt = self._engine.get_tensor_dtype(name)
        if dt not in mapping:
            raise EngineError(f"engine tensor {name} has unsupported dtype {dt}")
        return mapping[dt]

    # ---- inference -----------------------------------------------------------------------------------------
    def infer_impl(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        import torch

        ids_all = np.asarray(input_ids)
        mask_all = np.asarray(attention_mask)
        if ids_all.shape != mask_all.shape or ids_all.ndim != 2:
            raise UserInputError(f"input_ids {ids_all.shape} and attention_mask {mask_all.shape} must both be [batch, seq]")
        context, stream = self._context()
        outs = []
        in_names = self.sidecar.inputs
        for chunk in plan_chunks(ids_all.shape[0], ids_all.shape[1], self.batch_range, self.seq_range):
            ids, mask = fit_chunk(ids_all, mask_all, chunk)
            with torch.cuda.stream(stream):
                tensors = {}
                for name, arr in zip(in_names, (ids, mask)):
                    t = torch.from_numpy(arr).to(device=f"cuda:{self.device}", dtype=self._torch_dtype(name), non_blocking=False)
                    if not context.set_input_shape(name, tuple(t.shape)):
                        raise EngineError(f"TensorRT refused input shape {tuple(t.shape)} for {name} (profile "
                                          f"batch {self.batch_range.as_list()}, seq {self.seq_range.as_list()})")
                    tensors[name] = t
                out_shape = tuple(context.get_tensor_shape(self.sidecar.output))
                if any(d < 0 for d in out_shape):
                    raise EngineError(f"output shape {out_shape} is not resolved after setting input shapes")
                out = torch.empty(out_shape, dtype=self._torch_dtype(self.sidecar.output), device=f"cuda:{self.device}")
                for name, t in tensors.items():
                    context.set_tensor_address(name, t.data_ptr())
                context.set_tensor_address(self.sidecar.output, out.data_ptr())
                if not context.execute_async_v3(stream.cuda_stream):
                    raise EngineError("TensorRT execute_async_v3 failed (see the TensorRT log)")
            stream.synchronize()
            rows = chunk.stop - chunk.start
            outs.append(out[:rows].float().cpu().numpy())
        return np.concatenate(outs, axis=0)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "engine": str(self.engine_path), "precision": self.sidecar.precision,
                "trt_version": self.sidecar.trt_version, "gpu": self.sidecar.gpu_name,
                "batch_profile": self.batch_range.as_list(), "seq_profile": self.seq_range.as_list(),
                "contexts": len(self._contexts)}
