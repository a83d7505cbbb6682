"""The Q/DQ check and the int8 engine stage on the project's own int8 output (calibrate stage, demo:tiny-mistral)."""

from __future__ import annotations

import shutil

import pytest

from sfr_export.artifact import Manifest


@pytest.fixture(scope="module")
def tiny_calibrated(tiny_export, tmp_path_factory):
    from sfr_export.stages.calibrate import CalibrateConfig, run_calibrate

    root = tmp_path_factory.mktemp("tiny-int8") / "tiny"
    shutil.copytree(tiny_export, root)
    m = Manifest.load(root)
    m.data["stages"] = {k: v for k, v in m.data["stages"].items() if k == "export:fp32"}
    m.save()
    run_calibrate(root, CalibrateConfig(samples=8, holdout=4, seed=0))
    return root


@pytest.mark.slow
def test_project_int8_conforms_and_cpu_form_does_not(tiny_calibrated):
    from sfr_export.tensorrt.qdq_check import check_qdq
    from sfr_export.artifact import load_spec
    from sfr_export.artifact import Precision
    from sfr_export.stages.engine import EngineConfig, run_engine

    m = Manifest.load(tiny_calibrated)
    report = check_qdq(m.artifact_path("calibrate:int8", "onnx"))
    assert report, report.summary(10)
    assert report.stats["weight_dq"] >= 14 * 0.75  # 2 layers x 7 linears, at most 25% left float
    cpu = check_qdq(m.artifact_path("calibrate:int8-cpu", "onnx"))
    assert not cpu and "domain" in cpu.rules_failed  # MatMulNBits: ONNX Runtime's form, not TensorRT's
    rec = run_engine(tiny_calibrated, EngineConfig.for_spec(load_spec(tiny_calibrated), precision=Precision.INT8))
    assert rec.figures["qdq_check"]["passed"] is True
    assert rec.status in ("skipped", "ok")
