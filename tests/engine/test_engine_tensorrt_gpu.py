"""End to end on a GPU with TensorRT 11: build an engine, run it against ONNX Runtime, reject bad engines/shapes.

Skipped (with the reason) where TensorRT or a CUDA GPU is missing, which is every CPU CI machine.
"""

from __future__ import annotations

import numpy as np
import pytest

from sfr_export.stages.engine import probe_environment

pytestmark = [pytest.mark.gpu, pytest.mark.tensorrt]
ENV = probe_environment()
if not ENV.ok:
    pytestmark.append(pytest.mark.skip(reason=f"needs TensorRT 11 and a CUDA GPU: {ENV.reason}"))


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory):
    import shutil

    from tests.conftest import exported

    from sfr_export.artifact import Precision
    from sfr_export.stages.engine import EngineConfig, ShapeRange, run_engine

    src = exported(tmp_path_factory, "demo:tiny-mistral", "fp16")
    root = tmp_path_factory.mktemp("trt") / "tiny"
    shutil.copytree(src, root)
    rec = run_engine(root, EngineConfig(precision=Precision.FP16, batch=ShapeRange(1, 4, 8, name="batch"),
                                        seq=ShapeRange(4, 32, 64, name="seq"), workspace_gib=2))
    assert rec.status == "ok", rec.reason
    return root


def test_engine_matches_onnxruntime_and_splits_batches(engine_dir):
    from sfr_export.artifact import Manifest
    from sfr_export.runtime.ort_runner import OrtRunner
    from sfr_export.runtime.tensorrt_runner import TensorRTRunner
    from sfr_export.vectors import row_cosine

    rng = np.random.default_rng(0)
    ids = rng.integers(3, 32000, size=(11, 20)).astype(np.int64)  # 11 > max batch 8: split in two calls
    mask = np.ones_like(ids)
    mask[3, 12:] = 0
    with TensorRTRunner.from_manifest(Manifest.load(engine_dir)) as trt, \
            OrtRunner(engine_dir / "onnx" / "fp32" / "model.onnx") as ort_runner:
        cos = row_cosine(ort_runner.infer(ids, mask), trt.infer(ids, mask))
        assert cos.min() > 0.999
        one = trt.infer(ids[:1, :2], mask[:1, :2])  # under min seq 4: right-padded with mask 0
        np.testing.assert_allclose(one, ort_runner.infer(ids[:1, :2], mask[:1, :2]), atol=2e-2)
        from sfr_export.errors import UserInputError

        with pytest.raises(UserInputError, match="exceeds the TensorRT engine's profile max 64"):
            trt.infer(np.ones((1, 65), np.int64), np.ones((1, 65), np.int64))


def test_sidecar_and_threads(engine_dir):
    import json
    import threading

    from sfr_export.artifact import Manifest
    from sfr_export.runtime.tensorrt_runner import TensorRTRunner

    side = json.loads((engine_dir / "engine" / "fp16" / "model.plan.json").read_text())
    assert side["trt_version"] == ENV.trt_version and side["compute_capability"] == ENV.compute_capability
    assert side["profiles"]["input_ids"] == [[1, 4], [4, 32], [8, 64]]
    runner = TensorRTRunner.from_manifest(Manifest.load(engine_dir))
    runner.activate()
    ids = np.full((2, 8), 7, np.int64)
    results = []
    threads = [threading.Thread(target=lambda: results.append(runner.infer(ids, np.ones_like(ids)))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3 and runner.describe()["contexts"] == 3
    np.testing.assert_allclose(results[0], results[2], atol=1e-5)


def test_corrupt_engine_and_other_version_are_clear_errors(engine_dir, tmp_path):
    import shutil

    from sfr_export.errors import EngineError
    from sfr_export.artifact import Manifest
    from sfr_export.runtime.tensorrt_runner import TensorRTRunner
    from sfr_export.stages.engine import EngineSidecar

    root = tmp_path / "bad"
    shutil.copytree(engine_dir, root)
    plan = root / "engine" / "fp16" / "model.plan"
    plan.write_bytes(plan.read_bytes()[: plan.stat().st_size // 3])
    with pytest.raises(EngineError, match="could not deserialize"):
        TensorRTRunner.from_manifest(Manifest.load(root), verify=False).activate()
    side = EngineSidecar.load(root / "engine" / "fp16" / "model.plan.json")
    side.trt_version = "10.0.0.0"
    with pytest.raises(EngineError, match="rebuild"):
        TensorRTRunner(engine_dir / "engine" / "fp16" / "model.plan", side).activate()
