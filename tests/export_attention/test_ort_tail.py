"""The last layer's tail on the pooled rows: taken where the tail is row-wise (proven on its own), refused where it
mixes rows or where the graph has no last-token pooling."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from sfr_export.stages.ort_attention import _prune
from sfr_export.stages.ort_tail import find_tail, trim_tail

D, V = 8, 50


def _graph(mix_rows: bool = False, pooling: bool = True):
    """Embedding, one attention op, a linear and a residual Add, then last-token pooling (argmax of mask * position,
    as the export writes it). ``mix_rows`` puts a CumSum over positions into the tail."""
    rng = np.random.default_rng(0)
    h = "r2" if mix_rows else "r"
    nodes = [helper.make_node("Gather", ["emb", "input_ids"], ["x"]),
             helper.make_node("MultiHeadAttention", ["x", "x", "x"], ["a"], domain="com.microsoft", num_heads=2),
             helper.make_node("MatMul", ["a", "w"], ["o"]),
             helper.make_node("Add", ["x", "o"], ["r"]),
             *([helper.make_node("CumSum", ["r", "one"], ["r2"])] if mix_rows else []),
             helper.make_node("Shape", ["attention_mask"], ["shape"]),
             helper.make_node("Gather", ["shape", "one"], ["l"]),
             helper.make_node("Range", ["zero", "l", "one"], ["pos"]),
             helper.make_node("Mul", ["attention_mask", "pos"], ["mp"]),
             helper.make_node("ArgMax", ["mp"], ["last"], axis=1, keepdims=1),
             helper.make_node("Unsqueeze", ["last", "two"], ["last3"]),
             helper.make_node("Expand", ["last3", "width"], ["idx"]),
             (helper.make_node("GatherElements", [h, "idx"], ["g"], axis=1) if pooling
              else helper.make_node("ReduceMean", [h, "one1"], ["g"])),
             helper.make_node("Squeeze", ["g", "one1"], ["y"])]
    inits = [numpy_helper.from_array(rng.standard_normal((V, D)).astype(np.float32), "emb"),
             numpy_helper.from_array(rng.standard_normal((D, D)).astype(np.float32), "w"),
             numpy_helper.from_array(np.array(0, np.int64), "zero"), numpy_helper.from_array(np.array(1, np.int64), "one"),
             numpy_helper.from_array(np.array([1], np.int64), "one1"), numpy_helper.from_array(np.array([2], np.int64), "two"),
             numpy_helper.from_array(np.array([1, 1, D], np.int64), "width")]
    g = helper.make_graph(nodes, "tail", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["B", "L"]),
                                          helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["B", "L"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", D])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid("com.microsoft", 1)],
                             ir_version=10)


def _run(model, ids, mask):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input_ids": ids, "attention_mask": mask})[0]


def _batch():
    rng = np.random.default_rng(1)
    ids = rng.integers(0, V, (3, 6)).astype(np.int64)
    mask = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]], np.int64)
    return ids, mask


def test_a_row_wise_tail_runs_on_the_pooled_rows_with_the_same_embeddings():
    m = _graph()
    ids, mask = _batch()
    before = _run(m, ids, mask)
    tail = find_tail(m.graph)
    assert tail is not None and set(tail.entries) == {"a", "x"}  # the attention output and the residual stream
    assert trim_tail(m) == 2  # the MatMul and the Add
    _prune(m.graph)
    ops = [n.op_type for n in m.graph.node]
    assert "GatherElements" not in ops and ops.count("GatherND") == 2
    np.testing.assert_allclose(_run(m, ids, mask), before, rtol=1e-6, atol=1e-6)


def test_a_tail_that_mixes_rows_or_no_last_token_pooling_is_left_alone():
    mixed = _graph(mix_rows=True)
    assert find_tail(mixed.graph) is not None  # found, but the proof on the cut-out tail refuses it
    for m in (mixed, _graph(pooling=False)):
        ops = [n.op_type for n in m.graph.node]
        assert trim_tail(m) == 0 and [n.op_type for n in m.graph.node] == ops
