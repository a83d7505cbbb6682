"""Integer GEMMs are exact on every x86 CPU: where ORT's u8 x s8 kernel saturates (no VNNI), the runner loads a copy
whose int8 weights are u8 with zero point 128 (sfr_export.runtime.ort_int8)."""

from __future__ import annotations

import platform
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from sfr_export.runtime.ort_int8 import as_u8_weights, exact_integer_form, u8s8_saturates

M, K, N = 64, 96, 80


def _saturating_case(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray], np.ndarray]:
    """u8 activations far from their zero point times full-range s8 weights: pairs of products past int16."""
    rng = np.random.default_rng(0)
    qa = rng.integers(-127, 128, (M, K))
    qw = rng.choice([-127, -120, 120, 127], (K, N)).astype(np.int8)
    sa = rng.uniform(0.5, 2, (M, 1)).astype(np.float32)
    sw = rng.uniform(0.01, 0.02, N).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("MatMulIntegerToFloat", ["a", "w", "sa", "sw", "zp"], ["y1"], domain="com.microsoft"),
         helper.make_node("MatMulIntegerToFloat", ["a", "w", "sa", "sw", "zp"], ["y2"], domain="com.microsoft")],
        "g", [helper.make_tensor_value_info("a", TensorProto.UINT8, ["M", K]),
              helper.make_tensor_value_info("sa", TensorProto.FLOAT, ["M", 1])],
        [helper.make_tensor_value_info("y1", TensorProto.FLOAT, ["M", N]),
         helper.make_tensor_value_info("y2", TensorProto.FLOAT, ["M", N])],
        [numpy_helper.from_array(qw, "w"), numpy_helper.from_array(sw, "sw"),
         helper.make_tensor("zp", TensorProto.UINT8, [], [128])])
    path = tmp_path / "mm.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]),
              str(path))
    ref = (qa.astype(np.float64) @ qw.astype(np.float64)) * sa * sw
    return path, {"a": (qa + 128).astype(np.uint8), "sa": sa}, ref


def test_u8_weight_copy_is_exact_and_the_file_untouched(tmp_path):
    path, feeds, ref = _saturating_case(tmp_path)
    before = path.read_bytes()
    with exact_integer_form(path, saturates=True) as p:
        assert p != path
        s = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
    y1, y2 = s.run(None, feeds)
    np.testing.assert_allclose(y1, ref, rtol=1e-5, atol=1e-4)  # exact where u8 x s8 would saturate
    np.testing.assert_array_equal(y1, y2)  # the shared weight converted once, both readers rewritten
    assert path.read_bytes() == before and not p.exists()  # the artifact is never rewritten; the copy is gone


def test_no_copy_where_nothing_saturates(tmp_path):
    path, _, _ = _saturating_case(tmp_path)
    with exact_integer_form(path, saturates=False) as p:
        assert p == path
    fp = tmp_path / "fp.onnx"
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    onnx.save(helper.make_model(g), str(fp))
    with exact_integer_form(fp, saturates=True) as p:
        assert p == fp  # no integer MatMul: nothing to rewrite


def test_rewrite_keeps_an_explicit_weight_zero_point(tmp_path):
    path, feeds, ref = _saturating_case(tmp_path)
    m = onnx.load(str(path))
    m.graph.initializer.append(numpy_helper.from_array(np.zeros(N, np.int8), "wzp"))
    for n in m.graph.node:
        n.input.append("wzp")
    assert as_u8_weights(m) == 2
    zp = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    assert zp["w"].dtype == np.uint8 and np.all(zp["wzp"] == 128)
    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(s.run(None, feeds)[0], ref, rtol=1e-5, atol=1e-4)


def test_the_cpu_flags_decide(tmp_path):
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("the flags matter on x86 only; elsewhere nothing saturates")
    vnni, avx2 = tmp_path / "vnni", tmp_path / "avx2"
    vnni.write_text("flags\t\t: fpu sse avx2 avx512f avx512bw avx512_vnni\n")
    avx2.write_text("flags\t\t: fpu sse avx avx2\n")
    assert not u8s8_saturates(vnni) and u8s8_saturates(avx2) and u8s8_saturates(tmp_path / "absent")


def test_qdq_graphs_run_as_written_where_the_integer_gemm_saturates(tmp_path):
    """The ``int8`` (Q/DQ) form: ORT fuses Q -> DQ -> MatMul <- DQ into its u8 x s8 GEMM unless told not to. Where that
    GEMM saturates the runner's session config keeps the Q/DQ arithmetic as written (DequantizeLinear, float MatMul),
    which equals the int8 products exactly; elsewhere the config is left as the artifact recorded it."""
    from sfr_export.runtime.ort_int8 import EXACT_QDQ_SESSION_CONFIG, exact_session_config

    rng = np.random.default_rng(1)
    qw = rng.choice([-127, -120, 120, 127], (K, N)).astype(np.int8)
    sw = rng.uniform(0.01, 0.02, N).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
         helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
         helper.make_node("DequantizeLinear", ["w", "sw", "zw"], ["wd"], axis=1),
         helper.make_node("MatMul", ["xd", "wd"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", N])],
        [numpy_helper.from_array(qw, "w"), numpy_helper.from_array(sw, "sw"),
         helper.make_tensor("zw", TensorProto.INT8, [N], [0] * N),
         helper.make_tensor("sx", TensorProto.FLOAT, [], [0.5]), helper.make_tensor("zx", TensorProto.INT8, [], [0])])
    path = tmp_path / "qdq.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)]), str(path))
    qx = rng.choice([-127, 127], (M, K))  # full-range int8 activations: pairs of products far past int16
    ref = (qx.astype(np.float64) * 0.5) @ (qw.astype(np.float64) * sw)
    config = {"session.qdq_matmulnbits_accuracy_level": "0"}
    assert exact_session_config(config, saturates=False) == config
    exact = exact_session_config(config, saturates=True)
    assert exact == {**config, **EXACT_QDQ_SESSION_CONFIG}
    o = ort.SessionOptions()
    for k, v in exact.items():
        o.add_session_config_entry(k, v)
    y = ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"]).run(None, {"x": (qx * 0.5).astype(np.float32)})[0]
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-3)
