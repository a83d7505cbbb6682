"""ONNX Runtime GPU providers: options, and the silent-CPU-fallback detection, tested on the CPU package's lists."""

from __future__ import annotations

import pytest

from sfr_export.errors import BackendUnavailableError, UserInputError
from sfr_export.runtime.ort_gpu import CPU_EP, CUDA_EP, TRT_EP, OrtGpuConfig, verify_gpu_session
from sfr_export.stages.engine import ShapeRange


def test_cuda_provider_list():
    assert OrtGpuConfig(device_id=1).providers() == [(CUDA_EP, {"device_id": "1"})]


def test_tensorrt_provider_options(tmp_path):
    cfg = OrtGpuConfig(provider="tensorrt", fp16=True, engine_cache_dir=str(tmp_path / "cache"),
                       batch=ShapeRange(1, 4, 16), seq=ShapeRange(8, 64, 256), workspace_gib=2, opt_level=4)
    (trt_name, trt), (cuda_name, _) = cfg.providers()
    assert (trt_name, cuda_name) == (TRT_EP, CUDA_EP)  # CUDA after TensorRT, never CPU
    assert trt["trt_engine_cache_enable"] == "True" and trt["trt_engine_cache_path"] == str(tmp_path / "cache")
    assert trt["trt_timing_cache_enable"] == "True"
    assert trt["trt_fp16_enable"] == "True"
    assert trt["trt_profile_min_shapes"] == "input_ids:1x8,attention_mask:1x8"
    assert trt["trt_profile_opt_shapes"] == "input_ids:4x64,attention_mask:4x64"
    assert trt["trt_profile_max_shapes"] == "input_ids:16x256,attention_mask:16x256"
    assert trt["trt_max_workspace_size"] == str(2 << 30) and trt["trt_builder_optimization_level"] == "4"
    assert all(isinstance(v, str) for v in trt.values())
    assert "trt_fp16_enable" not in OrtGpuConfig(provider="tensorrt", engine_cache_dir="c").providers()[0][1]


def test_bad_gpu_configs():
    with pytest.raises(UserInputError, match="unknown GPU provider"):
        OrtGpuConfig(provider="rocm")
    with pytest.raises(UserInputError, match="engine_cache_dir"):
        OrtGpuConfig(provider="tensorrt")
    with pytest.raises(UserInputError, match="device_id"):
        OrtGpuConfig(device_id=-1)


def test_requested_provider_missing_from_the_cpu_package_is_an_error():
    import onnxruntime as ort

    available = ort.get_available_providers()
    if CUDA_EP in available:  # pragma: no cover - onnxruntime-gpu installed
        pytest.skip("onnxruntime-gpu is installed: the CPU package's provider list is not available here")
    with pytest.raises(BackendUnavailableError, match=r"CUDAExecutionProvider not available.*onnxruntime-gpu"):
        verify_gpu_session(OrtGpuConfig(), available, [CPU_EP])


def test_silent_fallback_to_cpu_is_detected_unless_allowed():
    available = [TRT_EP, CUDA_EP, CPU_EP]  # what onnxruntime-gpu lists
    cfg = OrtGpuConfig(provider="tensorrt", engine_cache_dir="c")
    with pytest.raises(BackendUnavailableError, match=r"TensorrtExecutionProvider, CUDAExecutionProvider were requested but the session runs on CPUExecutionProvider"):
        verify_gpu_session(cfg, available, [CPU_EP])
    with pytest.raises(BackendUnavailableError, match="TensorrtExecutionProvider were requested"):
        verify_gpu_session(cfg, available, [CUDA_EP, CPU_EP])  # TensorRT EP failed to load, CUDA took over
    verify_gpu_session(cfg, available, [TRT_EP, CUDA_EP, CPU_EP])
    verify_gpu_session(OrtGpuConfig(provider="tensorrt", engine_cache_dir="c", allow_fallback=True), available, [CPU_EP])


def test_gpu_runner_on_the_cpu_package_refuses_to_run(tiny_export, tmp_path):
    import onnxruntime as ort

    if CUDA_EP in ort.get_available_providers():  # pragma: no cover
        pytest.skip("onnxruntime-gpu is installed")
    runner = OrtGpuConfig(provider="tensorrt", engine_cache_dir=str(tmp_path / "c")).runner(tiny_export / "onnx" / "fp32" / "model.onnx")
    with pytest.raises(BackendUnavailableError, match="not available in this onnxruntime build"):
        runner.activate()
    assert not runner.is_active
