"""RMSNorm chains into RMSNormalization: taken only for the exact exported chain, and the same function after."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from sfr_export.stages.ort_attention import _prune
from sfr_export.stages.ort_norms import fuse_rms_norms

D = 16


def _graph(cast_inside: bool = False, opset: int = 23):
    """y = w * (x * 1 / sqrt(mean(x^2) + eps)), then + 1; ``cast_inside`` puts a Cast into the chain, as fp16
    graphs export it."""
    n = "nc" if cast_inside else "n"
    nodes = [helper.make_node("Pow", ["x", "two"], ["p"]),
             helper.make_node("ReduceMean", ["p", "axes"], ["m"]),
             helper.make_node("Add", ["m", "eps"], ["a"]),
             helper.make_node("Sqrt", ["a"], ["s"]),
             helper.make_node("Reciprocal", ["s"], ["r"]),
             helper.make_node("Mul", ["x", "r"], ["n"]),
             *([helper.make_node("Cast", ["n"], ["nc"], to=TensorProto.FLOAT)] if cast_inside else []),
             helper.make_node("Mul", ["w", n], ["y0"]),
             helper.make_node("Add", ["y0", "one"], ["y"])]
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.array(2.0, np.float32), "two"),
             numpy_helper.from_array(np.array([-1], np.int64), "axes"),
             numpy_helper.from_array(np.array(1e-5, np.float32), "eps"),
             numpy_helper.from_array(np.array(1.0, np.float32), "one"),
             numpy_helper.from_array(rng.standard_normal(D).astype(np.float32), "w")]
    g = helper.make_graph(nodes, "rms", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", D])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", D])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


def _run(model, x):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_the_chain_becomes_one_op_with_the_same_output():
    x = np.random.default_rng(1).standard_normal((5, D)).astype(np.float32) * 30
    m = _graph()
    before = _run(m, x)
    assert fuse_rms_norms(m) == 1
    _prune(m.graph)
    assert [n.op_type for n in m.graph.node] == ["RMSNormalization", "Add"]
    np.testing.assert_allclose(_run(m, x), before, rtol=1e-6, atol=1e-6)


def test_other_chains_and_older_opsets_are_left_alone():
    for m in (_graph(cast_inside=True), _graph(opset=22)):
        ops = [n.op_type for n in m.graph.node]
        assert fuse_rms_norms(m) == 0 and [n.op_type for n in m.graph.node] == ops
