"""The Q/DQ conformance check: passes TensorRT-form graphs, names each broken rule, runs on CPU."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from engine_qdq_graphs import make_qdq_model
from sfr_export.errors import ArtifactError
from sfr_export.tensorrt.qdq_check import QdqCheckConfig, check_qdq


@pytest.mark.parametrize("kw", [{}, {"weight_only": True}, {"transposed_gemm": True}])
def test_conforming_graphs_pass(kw):
    report = check_qdq(make_qdq_model(**kw))
    assert report, report.summary()
    assert report.stats["weight_dq"] == 1 and report.stats["per_channel_weights"] == 1
    assert report.stats["activation_dq"] == (0 if kw.get("weight_only") else 1)


@pytest.mark.parametrize("kw,rule,needle", [
    ({"zp_value": 3}, "zero-point", "not 0"),
    ({"zp_dtype": onnx.TensorProto.UINT8, "zp_value": 128}, "signedness", "uint8"),
    ({"weight_axis": 0}, "axis", "output-channel axis is 1"),
    ({"transposed_gemm": True, "weight_axis": 0}, "axis", "output-channel axis is 0"),
    ({"per_tensor_weight": True}, "axis", "per-tensor"),
    ({"add_matmulnbits": True}, "domain", "com.microsoft::MatMulNBits"),
    ({"qdq_on_int64": True}, "integer-tensor", "int64"),
    ({"qdq_on_mask_cast": True}, "integer-tensor", "cast of the integer tensor 'mask'"),
    ({"dq_into_add": True}, "placement", "feeds Add"),
])
def test_each_broken_rule_fails_and_is_named(kw, rule, needle):
    report = check_qdq(make_qdq_model(**kw))
    assert not report
    assert rule in report.rules_failed
    assert any(needle in v.message for v in report.violations), report.summary(10)


def test_per_tensor_weights_can_be_allowed():
    assert check_qdq(make_qdq_model(per_tensor_weight=True), QdqCheckConfig(require_per_channel_weights=False))


def test_float_model_is_not_a_quantized_model(tiny_export):
    report = check_qdq(tiny_export / "onnx" / "fp32" / "model.onnx")
    assert not report and report.rules_failed == {"empty"}


def test_conforming_graph_runs_in_onnxruntime_close_to_float():
    import onnxruntime as ort

    model = make_qdq_model(weight_only=True)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).normal(size=(3, 16)).astype(np.float32)
    w = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    ref = x @ (w["w_q"].astype(np.float32) * w["w_scale"])
    # ONNX Runtime's CPU kernels may fuse DQ+MatMul with its own int8 arithmetic: close, not bit-exact.
    np.testing.assert_allclose(sess.run(None, {"x": x})[0], ref, rtol=0, atol=5e-3)


def test_weight_only_tiny_mistral_passes_and_stays_faithful(tiny_export, tiny_int8_onnx):
    """The TensorRT form on a real decoder graph: conforms, and ONNX Runtime CPU keeps cos > 0.999 vs fp32."""
    from sfr_export.runtime.ort_runner import OrtRunner
    from sfr_export.vectors import row_cosine

    report = check_qdq(tiny_int8_onnx)
    assert report, report.summary()
    assert report.stats["quantized_linear"] == report.stats["weight_dq"] >= 14
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 32000, size=(4, 24)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, 17:] = 0
    with OrtRunner(tiny_export / "onnx" / "fp32" / "model.onnx") as f32, OrtRunner(tiny_int8_onnx) as i8:
        cos = row_cosine(f32.infer(ids, mask), i8.infer(ids, mask))
    assert cos.min() > 0.999, cos


def test_onnxruntime_default_qdq_is_rejected_for_tensorrt(tiny_export, tmp_path):
    """quantize_static's default QDQ (uint8 asymmetric activations) is ORT's form, not TensorRT's."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            rng = np.random.default_rng(0)
            self.it = iter([{"input_ids": rng.integers(3, 32000, (2, 12)).astype(np.int64),
                             "attention_mask": np.ones((2, 12), np.int64)}])

        def get_next(self):
            return next(self.it, None)

    out = tmp_path / "ort_qdq.onnx"
    quantize_static(str(tiny_export / "onnx" / "fp32" / "model.onnx"), str(out), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                    op_types_to_quantize=["MatMul"])
    report = check_qdq(out)
    assert not report
    assert {"zero-point", "signedness"} <= report.rules_failed


def test_cli_check_qdq_exit_codes(tmp_path, capsys):
    from sfr_export.cli import main

    good, bad = tmp_path / "good.onnx", tmp_path / "bad.onnx"
    onnx.save(make_qdq_model(), good)
    onnx.save(make_qdq_model(zp_value=5), bad)
    assert _cli(main, ["check-qdq", str(good)]) == 0
    assert '"passed": true' in capsys.readouterr().out
    assert _cli(main, ["check-qdq", str(bad)]) == 2
    cap = capsys.readouterr()
    assert '"passed": false' in cap.out and "Q/DQ check failed" in cap.err


def test_corrupt_or_missing_model_is_an_artifact_error(tmp_path):
    p = tmp_path / "broken.onnx"
    p.write_bytes(make_qdq_model().SerializeToString()[:57])
    with pytest.raises(ArtifactError, match="not a readable ONNX model"):
        check_qdq(p)
    with pytest.raises(ArtifactError, match="does not exist"):
        check_qdq(tmp_path / "missing.onnx")


def _cli(main, args) -> int:
    """Exit code of ``sfr-export ARGS`` (main returns normally on success)."""
    try:
        main(args)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0
