"""Sidecar compatibility: which TensorRT versions and GPUs may run an engine, and the errors that say to rebuild."""

from __future__ import annotations

import time

import pytest

from sfr_export.errors import ChecksumMismatchError, EngineError, MissingDependencyError
from sfr_export.artifact import ArtifactRecord, Manifest, StageRecord
from sfr_export.stages.engine import EngineConfig, EngineSidecar, check_compatibility


def sidecar(**kw) -> EngineSidecar:
    base = dict(trt_version="11.4.0.106", gpu_name="NVIDIA H200", compute_capability="9.0",
                profiles=EngineConfig().profile_shapes(), precision="fp16", source_onnx="onnx/fp16/model.onnx",
                source_onnx_sha256="0" * 64, build_seconds=1.0, built_at=time.time())
    base.update(kw)
    return EngineSidecar(**base)


def test_same_version_and_gpu_runs_without_warnings():
    assert check_compatibility(sidecar(), trt_version="11.4.0.106", gpu_name="NVIDIA H200", compute_capability="9.0") == []


@pytest.mark.parametrize("running", ["11.4.1.2", "11.3.0.1", "10.16.1.11", "12.0.0.0"])
def test_plain_engine_needs_the_exact_version(running):
    with pytest.raises(EngineError, match=r"built with TensorRT 11\.4\.0\.106.*rebuild"):
        check_compatibility(sidecar(), trt_version=running, gpu_name="NVIDIA H200", compute_capability="9.0")


def test_version_compatible_engine_runs_on_later_minor_only():
    vc = sidecar(version_compatible=True)
    assert check_compatibility(vc, trt_version="11.5.0.1", gpu_name="NVIDIA H200", compute_capability="9.0") == []
    for running in ("11.3.9.0", "12.0.0.0", "10.16.0.0"):
        with pytest.raises(EngineError, match="rebuild"):
            check_compatibility(vc, trt_version=running, gpu_name="NVIDIA H200", compute_capability="9.0")


def test_other_compute_capability_is_an_error_other_model_a_warning():
    with pytest.raises(EngineError, match=r"compute capability 9\.0 .*this GPU is NVIDIA A100.*8\.0.*rebuild"):
        check_compatibility(sidecar(), trt_version="11.4.0.106", gpu_name="NVIDIA A100", compute_capability="8.0")
    warnings = check_compatibility(sidecar(), trt_version="11.4.0.106", gpu_name="NVIDIA H100 80GB HBM3",
                                   compute_capability="9.0")
    assert len(warnings) == 1 and "built on NVIDIA H200" in warnings[0]


def test_sidecar_round_trip_and_corrupt_sidecar(tmp_path):
    sc = sidecar(precision="int8", lean_runtime_excluded=True, version_compatible=True)
    p = tmp_path / "model.plan.json"
    p.write_text(sc.to_json())
    back = EngineSidecar.load(p)
    assert back == sc
    assert back.batch_range().as_list() == [1, 8, 32] and back.seq_range().as_list() == [1, 128, 512]
    p.write_text('{"trt_version": "11.4"')
    with pytest.raises(EngineError, match="corrupt.*rebuild"):
        EngineSidecar.load(p)
    with pytest.raises(EngineError, match="missing"):
        EngineSidecar.load(tmp_path / "nope.json")


def _record_engine(root, plan: bytes) -> None:
    """Record an 'engine' stage as a GPU machine would have (the plan bytes are not a real engine)."""
    d = root / "engine" / "fp16"
    d.mkdir(parents=True)
    (d / "model.plan").write_bytes(plan)
    (d / "model.plan.json").write_text(sidecar().to_json())
    m = Manifest.load(root)
    m.record(StageRecord(stage="engine", name="engine", config=EngineConfig().to_dict(),
                         artifacts=[ArtifactRecord.of(root, d / "model.plan", "engine"),
                                    ArtifactRecord.of(root, d / "model.plan.json", "engine-sidecar")]))


def test_truncated_engine_is_caught_before_tensorrt(artifact_copy):
    from sfr_export.runtime.tensorrt_runner import TensorRTRunner

    _record_engine(artifact_copy, b"\x00" * 4096)
    plan = artifact_copy / "engine" / "fp16" / "model.plan"
    plan.write_bytes(plan.read_bytes()[:1000])
    with pytest.raises(ChecksumMismatchError, match="truncated or replaced"):
        TensorRTRunner.from_manifest(Manifest.load(artifact_copy), verify=True)


def test_runner_without_an_engine_or_tensorrt_is_a_clear_error(artifact_copy):
    from sfr_export.runtime.tensorrt_runner import TensorRTRunner
    from sfr_export.runtime import Embedder

    with pytest.raises(EngineError, match="has no built TensorRT engine"):
        TensorRTRunner.from_manifest(Manifest.load(artifact_copy))
    _record_engine(artifact_copy, b"\x00" * 4096)
    runner = TensorRTRunner.from_manifest(Manifest.load(artifact_copy))
    assert runner.batch_range.as_list() == [1, 8, 32]
    pytest.importorskip("torch")
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(MissingDependencyError, match=r"TensorRT is not installed.*sfr-export\[gpu\]"):
            runner.activate()
        with pytest.raises(MissingDependencyError):
            Embedder.from_artifact(artifact_copy, backend="tensorrt")
    else:  # pragma: no cover - GPU machines
        pytest.skip("TensorRT is installed: the missing-TensorRT path cannot be shown here")
