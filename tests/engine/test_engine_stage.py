"""The engine stage on a machine without TensorRT/GPU: skipped with the reason in the manifest and the CLI."""

from __future__ import annotations

import shutil

import pytest

from sfr_export.errors import ArtifactError
from sfr_export.artifact import ArtifactRecord, Manifest, StageRecord
from sfr_export.artifact import Precision
from sfr_export.stages.engine import EngineConfig, GpuEnvironment, probe_environment, run_engine

NO_TRT = not probe_environment().ok
needs_no_trt = pytest.mark.skipif(not NO_TRT, reason="this machine has TensorRT and a GPU: the skip path does not apply")


def _add_int8(root, onnx_path) -> None:
    """Stand in for the calibrate stage: put an int8 ONNX where calibrate:int8 records it."""
    d = root / "onnx" / "int8"
    d.mkdir(parents=True)
    shutil.copy(onnx_path, d / "model.onnx")
    m = Manifest.load(root)
    m.record(StageRecord(stage="calibrate", name="calibrate:int8", config={"variant": "int8"},
                         artifacts=[ArtifactRecord.of(root, d / "model.onnx", "onnx")]))


@needs_no_trt
def test_skip_is_recorded_with_reason(artifact_copy):
    rec = run_engine(artifact_copy, EngineConfig(precision=Precision.FP32))
    assert rec.status == "skipped"
    assert "TensorRT is not installed" in rec.reason or "no CUDA GPU" in rec.reason
    saved = Manifest.load(artifact_copy).stage("engine")
    assert saved is not None and saved.status == "skipped" and saved.reason == rec.reason
    assert not (artifact_copy / "engine" / "fp32" / "model.plan").exists()


def test_no_gpu_reason_is_explicit(artifact_copy):
    env = GpuEnvironment(False, "no CUDA GPU is visible (torch.cuda.is_available() is False)", trt_version="11.4.0")
    rec = run_engine(artifact_copy, EngineConfig(precision=Precision.FP32), env=env)
    assert rec.status == "skipped" and "no CUDA GPU" in rec.reason


def test_missing_source_onnx_names_the_command(artifact_copy):
    with pytest.raises(ArtifactError, match=r"no 'export:fp16' ONNX.*sfr-export export --precision fp16"):
        run_engine(artifact_copy, EngineConfig(precision=Precision.FP16))
    with pytest.raises(ArtifactError, match=r"no 'calibrate:int8'.*--precision int8"):
        run_engine(artifact_copy, EngineConfig(precision=Precision.INT8))


@needs_no_trt
def test_int8_runs_the_qdq_check_even_without_tensorrt(artifact_copy, tiny_int8_onnx, tmp_path):
    _add_int8(artifact_copy, tiny_int8_onnx)
    rec = run_engine(artifact_copy, EngineConfig(precision=Precision.INT8))
    assert rec.status == "skipped"
    assert rec.figures["qdq_check"]["passed"] is True
    assert rec.figures["qdq_check"]["stats"]["weight_dq"] >= 14


@needs_no_trt
def test_int8_nonconforming_graph_is_named_in_the_skip_reason(artifact_copy, tmp_path):
    import onnx

    from engine_qdq_graphs import make_qdq_model

    bad = tmp_path / "bad.onnx"
    onnx.save(make_qdq_model(add_matmulnbits=True), bad)
    _add_int8(artifact_copy, bad)
    rec = run_engine(artifact_copy, EngineConfig(precision=Precision.INT8))
    assert rec.status == "skipped"
    assert "MatMulNBits" in rec.reason and rec.figures["qdq_check"]["passed"] is False


@needs_no_trt
def test_cli_prints_the_skip_without_traceback(artifact_copy, capsys):
    from sfr_export.cli import main

    assert _cli(main, ["engine", str(artifact_copy), "--precision", "fp32", "--batch", "1,4,8", "--seq", "1,32,64"]) == 0
    cap = capsys.readouterr()
    assert "engine stage skipped" in cap.err and "Traceback" not in cap.err + cap.out
    assert '"status": "skipped"' in cap.out and '"seq_profile": [\n    1,\n    32,\n    64\n  ]' in cap.out


def test_cli_bad_profile_is_one_line(artifact_copy, capsys):
    from sfr_export.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["engine", str(artifact_copy), "--precision", "fp32", "--batch", "8,4,2"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "MIN <= OPT <= MAX" in err and "Traceback" not in err


@needs_no_trt
def test_build_fp16_succeeds_and_records_the_engine_skip(tmp_path_factory, tiny_model, tmp_path):
    from tests.conftest import exported

    from sfr_export.pipeline import BuildConfig, build

    src = exported(tmp_path_factory, "demo:tiny-mistral", "fp16")  # shared: build finds both exports up to date
    root = tmp_path / "b"
    shutil.copytree(src, root)
    m = Manifest.load(root)
    m.data["stages"] = {k: v for k, v in m.data["stages"].items() if k.startswith("export:")}
    m.save()
    records = build(root, tiny_model, BuildConfig(precision=Precision.FP16, verify=False))
    names = [r.name for r in records]
    assert names[:3] == ["export:fp32", "export:fp16", "engine"]
    assert records[2].status == "skipped" and "TensorRT" in records[2].reason
    saved = Manifest.load(root)
    assert saved.stage("export:fp16").status == "ok" and saved.stage("engine").status == "skipped"


def _cli(main, args) -> int:
    """Exit code of ``sfr-export ARGS`` (main returns normally on success)."""
    try:
        main(args)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


@needs_no_trt
def test_engine_built_elsewhere_is_kept_only_for_the_same_precision(artifact_copy):
    d = artifact_copy / "engine" / "fp32"
    d.mkdir(parents=True)
    (d / "model.plan").write_bytes(b"plan from a GPU machine")
    m = Manifest.load(artifact_copy)
    m.record(StageRecord(stage="engine", name="engine", config=EngineConfig(precision=Precision.FP32).to_dict(),
                         artifacts=[ArtifactRecord.of(artifact_copy, d / "model.plan", "engine")]))
    kept = run_engine(artifact_copy, EngineConfig(precision=Precision.FP32))
    assert kept.status == "ok"  # not overwritten by a skip on a machine without TensorRT
    replaced = run_engine(artifact_copy, EngineConfig(precision=Precision.FP32), force=True)
    assert replaced.status == "skipped"
