"""Stage 4: build a TensorRT 11 engine from the fp16 or Q/DQ int8 ONNX, with a JSON sidecar.

TensorRT 11 networks are always strongly typed: there are no FP16/INT8 builder flags and no calibrators. The
precision of the engine is the precision of the ONNX graph (an fp16 graph with fp32 norms, or explicit Q/DQ int8),
so this stage only parses, sets profiles, workspace, optimisation level and a persistent timing cache, and builds.

Without TensorRT or a CUDA GPU the stage records ``status="skipped"`` with the reason (no traceback), so ``build``
still succeeds for the ONNX artifacts. The sidecar (``model.plan.json``) is what the runtime checks before it
deserializes: TRT version, GPU name and compute capability, profiles, precision, source ONNX sha256, build time.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ArtifactError, EngineError, UserInputError
from ..artifact import ArtifactRecord, Manifest, Precision, StageRecord, atomic_path, sha256_file
from ..artifact.engine_format import (INPUT_NAMES, OUTPUT_NAME, EngineSidecar, ShapeRange, check_compatibility,
                                      default_batch, default_seq)
from ..artifact.enums import ENGINE_SOURCE
from ..artifact.layout import ENGINE_DIR, ENGINE_FILE, SIDECAR_FILE, TIMING_CACHE_FILE
from .common import progress, run_worker, worker_main

log = logging.getLogger(__name__)

STAGE = "engine"
SOURCE_STAGES = {p: v.stage_name for p, v in ENGINE_SOURCE.items()}
__all__ = ["EngineConfig", "EngineSidecar", "ShapeRange", "check_compatibility", "run_engine", "INPUT_NAMES",
           "OUTPUT_NAME", "default_batch", "default_seq"]


# ------------------------------------------------------------------------------------------------------------------
# Profiles
# ------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EngineConfig:
    precision: Precision = Precision.FP16
    batch: ShapeRange = field(default_factory=default_batch)
    seq: ShapeRange = field(default_factory=lambda: default_seq(512))
    workspace_gib: float = 8.0
    opt_level: int = 3  # IBuilderConfig.builder_optimization_level, 0..5 (TensorRT's default is 3)
    timing_cache: str | None = None  # default: <root>/engine/timing.cache (persistent across builds)
    version_compatible: bool = False  # BuilderFlag.VERSION_COMPATIBLE: runs on later 11.x runtimes
    exclude_lean_runtime: bool = False  # BuilderFlag.EXCLUDE_LEAN_RUNTIME: smaller plan, needs tensorrt_lean to run

    def __post_init__(self) -> None:
        if not isinstance(self.precision, Precision):
            raise TypeError(f"EngineConfig.precision must be a Precision, got {self.precision!r}")
        if not 0.0 < self.workspace_gib <= 1024:
            raise UserInputError(f"workspace must be in (0, 1024] GiB, got {self.workspace_gib}")
        if not 0 <= self.opt_level <= 5:
            raise UserInputError(f"builder optimization level must be 0..5, got {self.opt_level}")
        if self.exclude_lean_runtime and not self.version_compatible:
            raise UserInputError("--exclude-lean-runtime only applies to --version-compatible engines")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EngineConfig":
        """The inverse of ``to_dict`` (job files and manifest records)."""
        d = dict(d)
        d["precision"] = Precision.parse(d["precision"])
        d["batch"], d["seq"] = ShapeRange(**d["batch"]), ShapeRange(**d["seq"])
        return cls(**d)

    @classmethod
    def for_spec(cls, spec: Any, *, precision: Precision = Precision.FP16, batch: str | None = None,
                 seq: str | None = None, **kw: Any) -> "EngineConfig":
        """Profiles from ``--batch``/``--seq`` strings, defaulting to the model spec; refuses seq max > spec max."""
        b = ShapeRange.parse(batch, name="batch") if batch else default_batch()
        s = ShapeRange.parse(seq, name="seq") if seq else default_seq(spec.max_length)
        if s.max > spec.max_length:
            raise UserInputError(f"--seq max {s.max} exceeds the model's max_length {spec.max_length}: "
                                 "inputs are truncated to max_length, so a longer profile only wastes memory")
        return cls(precision=precision, batch=b, seq=s, **kw)

    @property
    def workspace_bytes(self) -> int:
        return int(self.workspace_gib * (1 << 30))

    def profile_shapes(self) -> dict[str, list[list[int]]]:
        """input name -> [min, opt, max] shapes, each [batch, seq]."""
        shapes = [[self.batch.min, self.seq.min], [self.batch.opt, self.seq.opt], [self.batch.max, self.seq.max]]
        return {name: [list(s) for s in shapes] for name in INPUT_NAMES}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["precision"] = self.precision.value
        return d


# ------------------------------------------------------------------------------------------------------------------
# Environment probe (no traceback: a reason string)
# ------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GpuEnvironment:
    ok: bool
    reason: str = ""
    trt_version: str | None = None
    gpu_name: str | None = None
    compute_capability: str | None = None


def probe_environment(*, need_builder: bool = True) -> GpuEnvironment:
    """Is there a TensorRT (builder or lean runtime) and a CUDA GPU? Returns the reason when not."""
    import importlib

    from .._optional import available

    mod_name = "tensorrt" if available("tensorrt") else ("tensorrt_lean" if not need_builder and available("tensorrt_lean") else None)
    if mod_name is None:
        what = "TensorRT" if need_builder else "TensorRT or tensorrt-lean"
        return GpuEnvironment(False, f"{what} is not installed (pip install 'sfr-export[gpu]' on a CUDA machine)")
    try:
        trt = importlib.import_module(mod_name)
    except ImportError as exc:  # present but its CUDA libraries are not loadable
        return GpuEnvironment(False, f"{mod_name} is installed but cannot be imported: {exc}")
    import torch

    if not torch.cuda.is_available():
        return GpuEnvironment(False, "no CUDA GPU is visible (torch.cuda.is_available() is False)",
                              trt_version=str(trt.__version__))
    major, minor = torch.cuda.get_device_capability()
    return GpuEnvironment(True, trt_version=str(trt.__version__), gpu_name=torch.cuda.get_device_name(),
                          compute_capability=f"{major}.{minor}")


# ------------------------------------------------------------------------------------------------------------------
# Sidecar
# ------------------------------------------------------------------------------------------------------------------
# ------------------------------------------------------------------------------------------------------------------
# The build itself (TensorRT 11 Python API; runs in a worker subprocess)
# ------------------------------------------------------------------------------------------------------------------
def build_serialized(onnx_path: Path, cfg: EngineConfig, timing_cache_path: Path) -> tuple[bytes, bytes]:
    """Parse ``onnx_path`` (external data next to it), build, return (plan bytes, timing cache bytes)."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 11: always strongly typed, no creation flags needed
    parser = trt.OnnxParser(network, logger)
    progress(f"parsing {onnx_path.name}")
    # parse_from_file resolves external data relative to the model file's directory.
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineError(f"TensorRT's ONNX parser rejected {onnx_path}: " + "; ".join(errors[:5]))
    names = [network.get_input(i).name for i in range(network.num_inputs)]
    if list(names) != list(INPUT_NAMES):
        raise EngineError(f"{onnx_path} inputs are {names}, expected {list(INPUT_NAMES)}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, cfg.workspace_bytes)
    config.builder_optimization_level = cfg.opt_level
    if cfg.version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
        if cfg.exclude_lean_runtime:
            config.set_flag(trt.BuilderFlag.EXCLUDE_LEAN_RUNTIME)
    cache_bytes = timing_cache_path.read_bytes() if timing_cache_path.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        log.warning("timing cache %s does not match this GPU/TensorRT; starting a fresh one", timing_cache_path)
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=True)

    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in cfg.profile_shapes().items():
        profile.set_shape(name, tuple(lo), tuple(opt), tuple(hi))
    if config.add_optimization_profile(profile) < 0:
        raise EngineError(f"TensorRT rejected the optimization profile {cfg.profile_shapes()}")

    progress(f"building ({cfg.precision.value}, batch {cfg.batch.as_list()}, seq {cfg.seq.as_list()}, "
             f"opt level {cfg.opt_level})")
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineError(f"TensorRT could not build an engine from {onnx_path} (see the log for the failing layer)")
    return bytes(plan), bytes(config.get_timing_cache().serialize())


def _engine_job(job: dict[str, Any]) -> dict[str, Any]:
    cfg = EngineConfig.from_dict(job["config"])
    env = probe_environment()
    if not env.ok:
        raise EngineError(env.reason)
    onnx_path = Path(job["onnx"])
    out_dir = Path(job["out_dir"])
    cache_path = Path(job["timing_cache"])
    t0 = time.time()
    plan, cache = build_serialized(onnx_path, cfg, cache_path)
    seconds = time.time() - t0
    with atomic_path(out_dir / ENGINE_FILE) as tmp:
        tmp.write_bytes(plan)
    with atomic_path(cache_path) as tmp:
        tmp.write_bytes(cache)
    sidecar = EngineSidecar(trt_version=str(env.trt_version), gpu_name=str(env.gpu_name),
                            compute_capability=str(env.compute_capability), profiles=cfg.profile_shapes(),
                            precision=cfg.precision.value, source_onnx=job["onnx_rel"], source_onnx_sha256=job["onnx_sha256"],
                            build_seconds=seconds, built_at=time.time(), version_compatible=cfg.version_compatible,
                            lean_runtime_excluded=cfg.exclude_lean_runtime)
    with atomic_path(out_dir / SIDECAR_FILE) as tmp:
        tmp.write_text(sidecar.to_json(), encoding="utf-8")
    return {"build_seconds": seconds, "engine_bytes": len(plan), "trt_version": env.trt_version,
            "gpu_name": env.gpu_name, "compute_capability": env.compute_capability}


# ------------------------------------------------------------------------------------------------------------------
# Stage entry point
# ------------------------------------------------------------------------------------------------------------------
def source_onnx(manifest: Manifest, precision: Precision) -> tuple[str, Path]:
    stage = SOURCE_STAGES[precision]
    rec = manifest.stage(stage)
    if rec is None or rec.status == "skipped":
        hint = "`sfr-export build --precision int8`" if precision is Precision.INT8 else f"`sfr-export export --precision {precision.value}`"
        raise ArtifactError(f"{manifest.root} has no '{stage}' ONNX to build a {precision.value} engine from: run {hint} first")
    return stage, manifest.artifact_path(stage, "onnx")


def _skip(manifest: Manifest, cfg: EngineConfig, reason: str, figures: dict[str, Any]) -> StageRecord:
    rec = StageRecord(stage=STAGE, name=STAGE, config=cfg.to_dict(), status="skipped", reason=reason, figures=figures)
    manifest.record(rec)
    log.warning("engine stage skipped: %s", reason)
    return rec


def run_engine(root: Path, config: EngineConfig, *, force: bool = False, on_progress: Any = None,
               env: GpuEnvironment | None = None) -> StageRecord:
    """Build the engine of ``config.precision`` into ``root/engine/<precision>/`` and record stage "engine".

    Skips (status "skipped", with the reason) when TensorRT or a GPU is missing. For int8 the Q/DQ conformance
    check runs first, on any machine; its result is recorded in the stage figures.
    """
    from ..tensorrt.qdq_check import check_qdq

    root = Path(root)
    manifest = Manifest.load(root)
    stage, onnx_path = source_onnx(manifest, config.precision)
    manifest.verify_stage(stage)
    figures: dict[str, Any] = {"source_stage": stage}
    env = env or probe_environment()
    if config.precision is Precision.INT8:
        report = check_qdq(onnx_path)
        figures["qdq_check"] = report.to_dict()
        if not report:
            reason = f"the int8 ONNX fails TensorRT's explicit-quantization rules: {report.summary()}"
            if not env.ok:
                return _skip(manifest, config, f"{env.reason}; also, {reason}", figures)
            raise EngineError(reason)
    if not env.ok:
        existing = manifest.stage(STAGE)
        if existing is not None and existing.status == "ok" and not force \
                and existing.config.get("precision") == config.precision.value:
            log.warning("no TensorRT/GPU here (%s); keeping the engine recorded earlier", env.reason)
            return existing
        return _skip(manifest, config, env.reason, figures)

    config_dict = config.to_dict()
    existing = manifest.stage(STAGE)
    onnx_sha = sha256_file(onnx_path)
    if existing is not None and existing.status == "ok" and not force and existing.config == config_dict \
            and existing.figures.get("source_onnx_sha256") == onnx_sha:
        try:
            manifest.verify_stage(STAGE)
            sidecar = EngineSidecar.load(root / next(a.path for a in existing.artifacts if a.kind == "engine-sidecar"))
            check_compatibility(sidecar, trt_version=str(env.trt_version), gpu_name=str(env.gpu_name),
                                compute_capability=str(env.compute_capability))
            log.info("engine is up to date (use --force to rebuild)")
            return existing
        except (ArtifactError, EngineError, StopIteration) as exc:
            log.warning("rebuilding the engine: %s", exc)
    out_dir = root / ENGINE_DIR / config.precision.value
    out_dir.mkdir(parents=True, exist_ok=True)
    cache_path = Path(config.timing_cache) if config.timing_cache else root / ENGINE_DIR / TIMING_CACHE_FILE
    job = {"config": config_dict, "onnx": str(onnx_path), "onnx_rel": str(onnx_path.relative_to(root)),
           "onnx_sha256": onnx_sha, "out_dir": str(out_dir), "timing_cache": str(cache_path)}
    result = run_worker("sfr_export.stages.engine", job, log_path=root / "logs" / f"engine-{config.precision.value}.log",
                        on_progress=on_progress)
    arts = [ArtifactRecord.of(root, out_dir / ENGINE_FILE, "engine"),
            ArtifactRecord.of(root, out_dir / SIDECAR_FILE, "engine-sidecar")]
    rec = StageRecord(stage=STAGE, name=STAGE, config=config_dict, artifacts=arts,
                      figures={**figures, **result, "source_onnx_sha256": onnx_sha, "timing_cache": str(cache_path)})
    manifest.record(rec)
    return rec


if __name__ == "__main__":
    worker_main(_engine_job)
