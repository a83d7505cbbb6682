"""INT8 fidelity on real weights (slow): demo:minilm and demo:smollm2 through the calibrate stage with defaults.

Measured with ONNX Runtime (each artifact's recorded session config) against the PyTorch fp32 reference on the
first PAIRS STSBenchmark test pairs (the benchmark script uses all 1379) with the model's STS prompt.
"""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest

from sfr_export.manifest import Manifest
from sfr_export.runtime import Embedder
from sfr_export.stages.calibrate import CalibrateConfig, run_calibrate
from tests.conftest import exported

PAIRS = 400


def _stsb(data_dir, n):
    with open(data_dir / "STSBenchmark" / "stsb-en-test.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))[:n]
    return [r[0] for r in rows], [r[1] for r in rows], np.array([float(r[2]) for r in rows])


def _spearman(a, b):
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic) * 100


@pytest.mark.slow
@pytest.mark.parametrize("model", ["demo:minilm", "demo:smollm2"])
def test_int8_fidelity_on_real_weights(model, data_dir, tmp_path_factory):
    src = exported(tmp_path_factory, model, "fp32")
    root = tmp_path_factory.mktemp("real") / model.replace(":", "_")
    shutil.copytree(src, root, ignore=shutil.ignore_patterns("fp16", "logs"))
    recs = run_calibrate(root, CalibrateConfig(samples=96, holdout=32, pairs=100))
    assert [r.name for r in recs] == ["calibrate:int8", "calibrate:int8-cpu"]
    s1, s2, gold = _stsb(data_dir, PAIRS)
    with Embedder.from_artifact(root, backend="torch") as e:
        ref = e.encode(s1 + s2, prompt="STSBenchmark")
    sp_ref = _spearman((ref[:PAIRS] * ref[PAIRS:]).sum(1), gold)
    m = Manifest.load(root)
    for rec in recs:
        variant = rec.config["variant"]
        assert rec.status == "ok", rec.reason
        with Embedder.from_artifact(root, variant=variant) as e:
            out = e.encode(s1 + s2, prompt="STSBenchmark")
        cos = (ref * out).sum(1)
        d_sp = _spearman((out[:PAIRS] * out[PAIRS:]).sum(1), gold) - sp_ref
        assert cos.mean() >= 0.995 and np.percentile(cos, 1) >= 0.98, (variant, cos.mean(), np.percentile(cos, 1))
        assert abs(d_sp) <= 0.3, (variant, d_sp)
    q = m.stage("calibrate:int8")
    assert q.figures["mixed_precision"]["modes"].get("w8", 0) + q.figures["mixed_precision"]["modes"].get("w8a8", 0) > 0
