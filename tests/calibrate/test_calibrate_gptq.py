"""GPTQ int8 weight rounding (sfr_export.quant.gptq): its numerics, and the moments it reads from an ONNX graph."""

from __future__ import annotations

import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from sfr_export.quant.gptq import gptq_int8, input_moments, output_error
from sfr_export.quant.observe import quantize_weight


def _inputs(k: int, t: int = 2000, seed: int = 0) -> np.ndarray:
    """Correlated inputs with one large channel, as a decoder's linear inputs are."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((t, k)) @ (np.eye(k) + 0.3 * rng.standard_normal((k, k)))
    x[:, 3] *= 20.0
    return x


def test_gptq_keeps_the_scales_and_lowers_the_output_error():
    x = _inputs(96)
    h = x.T @ x
    w = np.random.default_rng(1).standard_normal((96, 40)) * 0.05  # [K, N]
    q0, s0 = quantize_weight(w, axis=1)
    q, s = gptq_int8(w, h)
    assert q.dtype == np.int8 and q.shape == w.shape and np.abs(q.astype(int)).max() <= 127
    np.testing.assert_array_equal(s, s0)
    assert output_error(w, q, s, h) < 0.5 * output_error(w, q0, s0, h)


def test_gptq_on_uncorrelated_inputs_is_round_to_nearest():
    """With H diagonal no column's error can be compensated by another: GPTQ must round each weight to nearest."""
    w = np.random.default_rng(2).standard_normal((64, 24))
    h = np.diag(np.random.default_rng(3).uniform(0.5, 4.0, 64))
    q0, _ = quantize_weight(w, axis=1)
    np.testing.assert_array_equal(gptq_int8(w, h)[0], q0)


def test_gptq_leaves_the_skipped_rows_out():
    """Rows that stay float (the fold's float channels) are 0 in the int8 weight and take no compensation: the
    result is what GPTQ gives on the weight and moments without them."""
    x = _inputs(48)
    h = x.T @ x
    w = np.random.default_rng(4).standard_normal((48, 16))
    q, s = gptq_int8(w, h, skip=(3, 7))
    assert not q[[3, 7]].any()
    rest = np.setdiff1d(np.arange(48), [3, 7])
    q2, s2 = gptq_int8(w[rest], h[np.ix_(rest, rest)])
    np.testing.assert_array_equal(q[rest], q2)
    np.testing.assert_array_equal(s, s2)


def test_gptq_refuses_moments_of_another_width():
    with pytest.raises(ValueError, match="does not match"):
        gptq_int8(np.ones((8, 4)), np.eye(6))


def _matmul_graph(path, k: int = 6, n: int = 5) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    emb = rng.standard_normal((50, k)).astype(np.float32)
    w = rng.standard_normal((k, n)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["emb", "input_ids"], ["x"]),
             helper.make_node("Relu", ["x"], ["y"]),
             helper.make_node("MatMul", ["y", "w"], ["z"]),
             helper.make_node("ReduceMean", ["z"], ["sentence_embedding"], axes=[1], keepdims=0)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "l"]),
                                       helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["b", "l"])],
                          [helper.make_tensor_value_info("sentence_embedding", TensorProto.FLOAT, ["b", n])],
                          [numpy_helper.from_array(emb, "emb"), numpy_helper.from_array(w, "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    onnx.save(m, str(path))
    return emb


@pytest.mark.parametrize("budget", [1 << 30, 1])  # one pass for both tensors, or one pass each
def test_input_moments_sum_the_attended_rows(tmp_path, budget):
    emb = _matmul_graph(tmp_path / "g.onnx")
    ids = np.array([[1, 2, 3, 0], [4, 5, 0, 0]])
    mask = (ids > 0).astype(np.int64)
    batches = [SimpleNamespace(input_ids=ids, attention_mask=mask), SimpleNamespace(input_ids=ids[:1], attention_mask=mask[:1])]
    store = input_moments(tmp_path / "g.onnx", {"a": ("x", 6), "b": ("y", 6)}, batches, {}, tmp_path / "m", budget)
    rows = np.concatenate([emb[[1, 2, 3, 4, 5]], emb[[1, 2, 3]]]).astype(np.float64)
    np.testing.assert_allclose(store.get("a"), rows.T @ rows, rtol=1e-5)
    relu = np.maximum(rows, 0)
    np.testing.assert_allclose(store.get("b"), relu.T @ relu, rtol=1e-5)
    assert store.tokens == 8 and store.get("c") is None
    assert not (tmp_path / "g.moments.onnx").exists()  # the probe graph is gone


def test_torch_moments_see_the_input_after_its_hooks():
    """The moments of a torch linear's input as its forward sees it: an input hook registered before (an online
    rotation) is applied first; padding rows are left out; any group budget gives the same sums."""
    import torch

    from sfr_export.quant.gptq import torch_moments

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(20, 4)
            self.a = torch.nn.Linear(4, 3)
            self.b = torch.nn.Linear(3, 2)

        def forward(self, input_ids, attention_mask):
            return self.b(self.a(self.emb(input_ids)))

    torch.manual_seed(0)
    m = Tiny()
    m.a.register_forward_pre_hook(lambda _m, a: (a[0] * 2.0,))
    ids = torch.tensor([[1, 2, 3], [4, 5, 0]])
    mask = (ids > 0).long()
    batches = [SimpleNamespace(input_ids=ids.numpy(), attention_mask=mask.numpy())]
    x = (m.emb.weight[[1, 2, 3, 4, 5]] * 2.0).double().detach()
    y = torch.nn.functional.linear(x, m.a.weight.double(), m.a.bias.double()).detach()  # a's output on those rows
    for budget in (1 << 30, 1):
        store = torch_moments(m, ["a", "b"], batches, Path(tempfile.mkdtemp()), budget)
        np.testing.assert_allclose(store.get("a"), (x.T @ x).numpy(), rtol=1e-5)
        np.testing.assert_allclose(store.get("b"), (y.T @ y).numpy(), rtol=1e-5)
        assert store.tokens == 5
