"""ONNX Runtime on GPUs (``onnxruntime-gpu``): CUDA EP and TensorRT EP options, and no silent CPU fallback.

ONNX Runtime drops an execution provider it cannot initialise (missing CUDA/cuDNN/TensorRT libraries) and runs on
CPU without saying so. ``OrtGpuConfig.runner`` builds an ``OrtRunner`` whose activation compares the providers
asked for with the ones the session really uses (``check_providers``) and raises ``BackendUnavailableError``
unless ``allow_fallback`` is set.

TensorRT EP notes (TensorRT 11): precision comes from the ONNX graph (fp16 export or Q/DQ int8); ``fp16`` sets
``trt_fp16_enable`` for ONNX Runtime builds that still honour it. Engines and timing caches are cached on disk
(``trt_engine_cache_path``), and the optimization profile is given explicitly so the engine is built once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserInputError
from ..artifact.engine_format import INPUT_NAMES, ShapeRange, default_batch, default_seq
from .ort_runner import OrtRunner, check_providers

CUDA_EP = "CUDAExecutionProvider"
TRT_EP = "TensorrtExecutionProvider"
CPU_EP = "CPUExecutionProvider"
PROVIDERS = {"cuda": (CUDA_EP,), "tensorrt": (TRT_EP, CUDA_EP)}

ProviderSpec = tuple[str, dict[str, str]]


@dataclass(frozen=True)
class OrtGpuConfig:
    provider: str = "cuda"  # cuda | tensorrt
    device_id: int = 0
    fp16: bool = False
    engine_cache_dir: str | None = None  # TensorRT EP engine + timing cache dir (required for tensorrt)
    batch: ShapeRange = field(default_factory=default_batch)
    seq: ShapeRange = field(default_factory=lambda: default_seq(512))
    workspace_gib: float = 4.0
    opt_level: int = 3
    allow_fallback: bool = False

    def __post_init__(self) -> None:
        if self.provider not in PROVIDERS:
            raise UserInputError(f"unknown GPU provider {self.provider!r} (expected {', '.join(PROVIDERS)})")
        if self.device_id < 0:
            raise UserInputError(f"device_id must be >= 0, got {self.device_id}")
        if self.provider == "tensorrt" and not self.engine_cache_dir:
            raise UserInputError("the TensorRT EP needs engine_cache_dir: without a cache every session rebuilds the engine")
        if not 0 <= self.opt_level <= 5:
            raise UserInputError(f"opt_level must be 0..5, got {self.opt_level}")

    def _shapes(self, which: str) -> str:
        b = getattr(self.batch, which)
        s = getattr(self.seq, which)
        return ",".join(f"{name}:{b}x{s}" for name in INPUT_NAMES)

    def providers(self) -> list[ProviderSpec]:
        """The provider list for ``InferenceSession(providers=...)`` with options as strings."""
        cuda: ProviderSpec = (CUDA_EP, {"device_id": str(self.device_id)})
        if self.provider == "cuda":
            return [cuda]
        cache = str(Path(str(self.engine_cache_dir)))
        trt: dict[str, str] = {
            "device_id": str(self.device_id),
            "trt_engine_cache_enable": "True",
            "trt_engine_cache_path": cache,
            "trt_timing_cache_enable": "True",
            "trt_timing_cache_path": cache,
            "trt_max_workspace_size": str(int(self.workspace_gib * (1 << 30))),
            "trt_builder_optimization_level": str(self.opt_level),
            "trt_profile_min_shapes": self._shapes("min"),
            "trt_profile_opt_shapes": self._shapes("opt"),
            "trt_profile_max_shapes": self._shapes("max"),
        }
        if self.fp16:
            trt["trt_fp16_enable"] = "True"
        # CUDA EP after TensorRT EP: nodes TensorRT cannot take run on CUDA, never silently on CPU.
        return [(TRT_EP, trt), cuda]

    def provider_names(self) -> list[str]:
        return [p[0] for p in self.providers()]

    def runner(self, onnx_path: Path, *, session_config: dict[str, str] | None = None) -> OrtRunner:
        if self.engine_cache_dir:
            Path(self.engine_cache_dir).mkdir(parents=True, exist_ok=True)
        return OrtRunner(Path(onnx_path), providers=self.providers(), session_config=session_config,
                         allow_fallback=self.allow_fallback)


def verify_gpu_session(config: OrtGpuConfig, available: Sequence[str], active: Sequence[str]) -> None:
    """Raise BackendUnavailableError when a requested GPU provider is missing or silently replaced by CPU."""
    check_providers(config.provider_names(), available, active, allow_fallback=config.allow_fallback)
