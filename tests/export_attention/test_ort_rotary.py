"""RoPE into GroupQueryAttention: the pattern is found only where it is RoPE, and the cache only where the graph's
cos/sin depend on the position alone (small synthetic graphs; the exported models are covered in
test_export_attention.py)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from sfr_export.stages.ort_rotary import find_rotary, rope_cache

H, D, V = 2, 8, 50
INV_FREQ = (1.0 / 10000 ** (np.arange(0, D, 2) / D)).astype(np.float32)


def _i64(name, values):
    return numpy_helper.from_array(np.asarray(values, np.int64), name)


def _graph(positions: str = "arange", swapped: bool = False):
    """x [B, H, L, D] from an embedding, rotated by the cos/sin of ``positions`` ("arange" or "cumsum" of the
    mask); ``swapped`` negates the wrong half (not RoPE)."""
    lo, hi = ("s_lo", "s_hi") if not swapped else ("s_hi", "s_lo")
    nodes = [
        helper.make_node("Gather", ["emb", "input_ids"], ["e"]),
        helper.make_node("Reshape", ["e", "shape4"], ["e4"]),
        helper.make_node("Transpose", ["e4"], ["x"], perm=[0, 2, 1, 3]),
        helper.make_node("Slice", ["x", "zero", "half", "ax3"], ["s_lo"]),
        helper.make_node("Slice", ["x", "half", "big", "ax3"], ["s_hi"]),
        helper.make_node("Neg", [hi], ["neg"]),
        helper.make_node("Concat", ["neg", lo], ["rot_half"], axis=-1),
    ]
    if positions == "arange":
        nodes += [helper.make_node("Shape", ["input_ids"], ["L1"], start=1, end=2),
                  helper.make_node("Squeeze", ["L1"], ["L"]),
                  helper.make_node("Range", ["zero_s", "L", "one_s"], ["pos1"]),
                  helper.make_node("Unsqueeze", ["pos1", "zero"], ["pos"])]
    else:
        nodes += [helper.make_node("CumSum", ["attention_mask", "one_s"], ["cs"]),
                  helper.make_node("Sub", ["cs", "one_s"], ["pos"])]
    nodes += [helper.make_node("Cast", ["pos"], ["posf"], to=TensorProto.FLOAT),
              helper.make_node("Unsqueeze", ["posf", "minus1"], ["pos3"]),
              helper.make_node("Mul", ["pos3", "inv_freq"], ["freqs"]),
              helper.make_node("Concat", ["freqs", "freqs"], ["embf"], axis=-1),
              helper.make_node("Cos", ["embf"], ["cos3"]), helper.make_node("Sin", ["embf"], ["sin3"]),
              helper.make_node("Unsqueeze", ["cos3", "one"], ["cos"]),
              helper.make_node("Unsqueeze", ["sin3", "one"], ["sin"]),
              helper.make_node("Mul", ["x", "cos"], ["xc"]),
              helper.make_node("Mul", ["rot_half", "sin"], ["rs"]),
              helper.make_node("Add", ["xc", "rs"], ["out"])]
    inits = [numpy_helper.from_array(np.random.default_rng(0).standard_normal((V, H * D)).astype(np.float32), "emb"),
             numpy_helper.from_array(INV_FREQ, "inv_freq"), _i64("shape4", [0, 0, H, D]), _i64("zero", [0]),
             _i64("half", [D // 2]), _i64("big", [2**62]), _i64("ax3", [3]), _i64("minus1", [-1]), _i64("one", [1]),
             _i64("zero_s", 0), _i64("one_s", 1)]
    g = helper.make_graph(nodes, "rope", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["B", "L"]),
                                          helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["B", "L"])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["B", H, "L", D])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)


def test_rope_is_found_and_its_cache_holds_the_graphs_own_cos_sin():
    m = _graph("arange")
    use = find_rotary(m.graph, "out", D)
    assert use is not None and (use.x, use.cos, use.sin) == ("x", "cos", "sin")
    cos, sin = rope_cache(m, use, 64, D)
    angles = np.outer(np.arange(64), INV_FREQ)
    np.testing.assert_allclose(cos, np.cos(angles), atol=1e-5)
    np.testing.assert_allclose(sin, np.sin(angles), atol=1e-5)


def test_the_wrong_half_negated_is_not_rope():
    assert find_rotary(_graph("arange", swapped=True).graph, "out", D) is None
    assert find_rotary(_graph("arange").graph, "xc", D) is None  # a Mul, not the Add


def test_positions_taken_from_the_mask_are_not_fused():
    """cumsum(mask) - 1 positions: a padded row's cos/sin differ from an unpadded one's, which GroupQueryAttention's
    first-prompt positions (0 .. L - 1) would not reproduce, so no cache is made."""
    m = _graph("cumsum")
    use = find_rotary(m.graph, "out", D)
    assert use is not None
    assert rope_cache(m, use, 64, D) is None


@pytest.mark.parametrize("positions", ["arange", "cumsum"])
def test_the_synthetic_graph_is_valid(positions):
    onnx.checker.check_model(_graph(positions), full_check=True)
