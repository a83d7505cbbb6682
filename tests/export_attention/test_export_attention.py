"""Fused attention in the exported graphs: no L x L Softmax, exact past the sliding window, right padding enforced."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from sfr_export.errors import UserInputError
from sfr_export.artifact import Manifest
from sfr_export.runtime.ort_runner import OrtRunner
from sfr_export.vectors import row_cosine


def _graph(root, variant="fp32", kind="onnx"):
    path = Manifest.load(root).artifact_path(f"export:{variant}", kind)
    return path, onnx.shape_inference.infer_shapes(onnx.load(str(path), load_external_data=False))


def _shapes(model):
    g = model.graph
    return {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in [*g.value_info, *g.input, *g.output]}


def _random_batch(lengths, vocab=32000, seed=0, side="right"):
    rng = np.random.default_rng(seed)
    width = max(lengths)
    ids = np.zeros((len(lengths), width), dtype=np.int64)
    mask = np.zeros_like(ids)
    for r, n in enumerate(lengths):
        cols = slice(0, n) if side == "right" else slice(width - n, width)
        ids[r, cols] = rng.integers(10, vocab - 1, size=n)
        mask[r, cols] = 1
    return ids, mask


def _torch(root):
    from sfr_export.runtime import Embedder

    return Embedder.from_artifact(root, backend="torch").runner


@pytest.mark.parametrize("variant", ["fp32", "fp16"])
def test_causal_graph_has_one_attention_node_per_layer_and_no_softmax(tiny_artifact, variant):
    _path, m = _graph(tiny_artifact, variant)
    ops = [n.op_type for n in m.graph.node]
    assert "Softmax" not in ops, "attention must not be decomposed into MatMul/Softmax over L x L scores"
    attn = [n for n in m.graph.node if n.op_type == "Attention"]
    assert len(attn) == 2  # demo:tiny-mistral has 2 layers
    shapes = _shapes(m)
    for n in attn:
        q, k = shapes[n.input[0]], shapes[n.input[1]]
        assert q[1] == 4 and k[1] == 2, "GQA: K/V keep their 2 heads (not repeated to 4)"
        # the sliding window (32 < 1024 positions) is one [L, L] band shared by every row and head
        assert len(n.input) == 4 and shapes[n.input[3]] == ["sequence", "sequence"], shapes.get(n.input[3])
    assert [i.name for i in m.graph.input] == ["input_ids", "attention_mask"]
    meta = {p.key: p.value for p in m.metadata_props}
    assert meta == {"sfr_export.attention": "causal", "sfr_export.padding_side": "right",
                    "sfr_export.sliding_window": "32"}


def test_cpu_form_is_group_query_attention_with_the_window(tiny_artifact):
    _path, m = _graph(tiny_artifact, "fp32", "onnx-cpu")
    ops = [n.op_type for n in m.graph.node]
    assert "Softmax" not in ops and "Attention" not in ops
    gqa = [n for n in m.graph.node if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == 2 and all(n.domain == "com.microsoft" for n in gqa)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in gqa[0].attribute}
    assert attrs["num_heads"] == 4 and attrs["kv_num_heads"] == 2 and attrs["local_window_size"] == 32


def test_cpu_form_takes_rope_into_group_query_attention(tiny_artifact):
    """Each layer's GroupQueryAttention rotates Q and K itself (do_rotary), from caches that hold transformers' own
    cos/sin for every position the model accepts (1,024 for demo:tiny-mistral); no RoPE op is left outside."""
    import torch

    path, m = _graph(tiny_artifact, "fp32", "onnx-cpu")
    ops = [n.op_type for n in m.graph.node]
    assert not {"Neg", "Slice", "Cos", "Sin"} & set(ops), "RoPE (rotate_half, its cos/sin) left in the graph"
    gqa = [n for n in m.graph.node if n.op_type == "GroupQueryAttention"]
    assert all(onnx.helper.get_attribute_value(a) == 1 for n in gqa for a in n.attribute if a.name == "do_rotary")
    assert all(len(n.input) == 9 and n.input[7] and n.input[8] for n in gqa)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}
    cos, sin = inits[gqa[0].input[7]], inits[gqa[0].input[8]]
    model = _torch(tiny_artifact).model
    half = model.config.hidden_size // model.config.num_attention_heads // 2
    assert cos.shape == sin.shape == (1024, half)  # max_position_embeddings x head_dim / 2
    ref_cos, ref_sin = model.rotary_emb(torch.zeros(1, 1024, 2 * half), torch.arange(1024)[None])
    np.testing.assert_allclose(cos, ref_cos[0, :, :half].numpy(), atol=2e-6)
    np.testing.assert_allclose(sin, ref_sin[0, :, :half].numpy(), atol=2e-6)


def test_cpu_form_runs_each_rms_norm_as_one_op(tiny_artifact):
    """2 layers x 2 norms + the final one, each one RMSNormalization carrying the model's weight and epsilon."""
    _path, m = _graph(tiny_artifact, "fp32", "onnx-cpu")
    ops = [n.op_type for n in m.graph.node]
    assert ops.count("RMSNormalization") == 5 and not {"Pow", "ReduceMean", "Sqrt", "Reciprocal"} & set(ops)
    model = _torch(tiny_artifact).model
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}
    norms = [n for n in m.graph.node if n.op_type == "RMSNormalization"]
    eps = [onnx.helper.get_attribute_value(a) for n in norms for a in n.attribute if a.name == "epsilon"]
    assert eps == [pytest.approx(model.config.rms_norm_eps)] * 5
    np.testing.assert_array_equal(inits[norms[-1].input[1]], model.norm.weight.detach().numpy())


def test_cpu_form_runs_the_last_layer_tail_on_the_pooled_rows(tiny_artifact):
    """Last-token pooling: after the last attention every node is row-wise, so the CPU form runs the last layer's
    o_proj and MLP on each text's pooled row alone (B rows); the portable form keeps B x L (both match torch: below)."""
    m = Manifest.load(tiny_artifact)
    ids, mask = _random_batch([37, 20, 1], seed=6)
    for kind, last_rows in (("onnx-cpu", 3), ("onnx", 3 * 37)):
        path = m.artifact_path("export:fp32", kind)
        shapes = _all_tensor_shapes(path, ids, mask)
        linears = [n.output[0] for n in onnx.load(str(path), load_external_data=False).graph.node if n.op_type == "MatMul"]
        rows = [int(np.prod(shapes[o][:-1])) for o in linears]
        assert len(rows) == 14 and rows[-4:] == [last_rows] * 4 and set(rows[:-4]) == {3 * 37}, (kind, rows)


def test_both_forms_match_torch_past_the_sliding_window(tiny_artifact):
    """Rows up to demo:tiny-mistral's max length (128), four times its window (32), right padded."""
    ids, mask = _random_batch([128, 100, 33, 7, 64])
    ref = _torch(tiny_artifact).infer(ids, mask)
    m = Manifest.load(tiny_artifact)
    for kind in ("onnx", "onnx-cpu"):
        with OrtRunner(m.artifact_path("export:fp32", kind)) as r:
            cos = row_cosine(ref, r.infer(ids, mask))
        assert cos.min() >= 0.99999, (kind, cos)


def test_left_padded_batch_is_repadded_never_silently_wrong(tiny_artifact):
    right_ids, right_mask = _random_batch([90, 40, 12], seed=3)
    left_ids, left_mask = _random_batch([90, 40, 12], seed=3, side="left")
    ref = _torch(tiny_artifact).infer(right_ids, right_mask)
    m = Manifest.load(tiny_artifact)
    for kind in ("onnx", "onnx-cpu"):
        with OrtRunner(m.artifact_path("export:fp32", kind)) as r:
            assert r.graph_padding == "right"
            assert row_cosine(ref, r.infer(left_ids, left_mask)).min() >= 0.99999, kind
            holes = right_mask.copy()
            holes[0, 5] = 0
            with pytest.raises(UserInputError, match="holes"):
                r.infer(right_ids, holes)


def test_causal_artifact_spec_and_embedder(tiny_artifact):
    from sfr_export.runtime import Embedder

    spec = json.loads((tiny_artifact / "spec.json").read_text())
    assert spec["graph_padding"] == "right" and spec["padding_side"] == "right"
    e = Embedder.from_artifact(tiny_artifact, backend="onnxruntime", variant="fp32")
    assert e.info["form"] == "onnx-cpu"  # the CPU provider runs the GroupQueryAttention form
    seen = []
    e.encode_ids(e.tokenize(["word " * 120] * 6).ids, max_batch_tokens=256, on_batch=seen.append)
    assert max(s.padded_tokens for s in seen) <= 256 and sum(s.rows for s in seen) == 6


def test_validation_covers_the_cpu_form_and_batches_by_tokens(tiny_artifact):
    v = Manifest.load(tiny_artifact).stage("export:fp32").figures["validation"]
    assert v["token_budget"] == 4096 and v["graph_padding"] == "right"
    for key in ("right_padding", "left_padding", "cpu_form_right_padding", "cpu_form_left_padding"):
        assert v[key]["min_cosine"] >= 0.99999, key
    assert max(v["right_padding"]["lengths"]) > 32  # past the window


def test_opset_below_23_is_refused():
    from sfr_export.stages.export import ExportConfig

    with pytest.raises(UserInputError, match="opset 18"):
        ExportConfig(opset=18)


def test_minilm_key_padding_mask_and_padding_invariance(minilm_artifact):
    _path, m = _graph(minilm_artifact)
    assert "Softmax" not in [n.op_type for n in m.graph.node]
    attn = [n for n in m.graph.node if n.op_type == "Attention"]
    assert len(attn) == 6 and len({n.input[3] for n in attn}) == 1, "one mask tensor shared by every layer"
    assert {p.key: p.value for p in m.metadata_props}["sfr_export.padding_side"] == "any"
    assert json.loads((minilm_artifact / "spec.json").read_text())["graph_padding"] == "any"
    from sfr_export.runtime import Embedder

    e = Embedder.from_artifact(minilm_artifact, backend="onnxruntime")
    assert e.info["form"] == "onnx-cpu"  # the CPU provider runs the MultiHeadAttention form of an encoder too
    text = "A man is playing a guitar."
    alone = e.encode([text])
    longer = "The stock market fell sharply today after the central bank raised interest rates again. " * 4
    # the spec's side (right): BERT's absolute positions make a left-padded row a different input, in torch too
    assert e.spec.padding_side == "right"
    batched = e.encode([longer, text])
    assert batched.shape == (2, 384) and float(alone[0] @ batched[1]) >= 0.99999


def _all_tensor_shapes(path, ids, mask):
    """Run ``path`` on ONNX Runtime CPU with every node output exposed; returns {tensor name: shape}."""
    import onnxruntime as ort

    m = onnx.load(str(path))
    names = [o for n in m.graph.node for o in n.output if o]
    known = {o.name for o in m.graph.output}
    m.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in known)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    outs = sess.run(None, {"input_ids": ids, "attention_mask": mask})
    return {o.name: np.shape(v) for o, v in zip(sess.get_outputs(), outs)}


def _two_length_axes(shapes, length):
    return sorted(name for name, shape in shapes.items() if list(shape).count(length) >= 2)


def test_minilm_cpu_form_is_flash_multihead_attention_with_no_length_squared_tensor(minilm_artifact):
    """Every node output at an odd L (37): the portable form has its [B, 1, L, L] mask, the CPU form nothing L x L."""
    m = Manifest.load(minilm_artifact)
    cpu = onnx.load(str(m.artifact_path("export:fp32", "onnx-cpu")), load_external_data=False)
    ops = [n.op_type for n in cpu.graph.node]
    assert "Attention" not in ops and "Softmax" not in ops
    mha = [n for n in cpu.graph.node if n.op_type == "MultiHeadAttention"]
    # three inputs only: no key_padding_mask / attention_bias, the condition of ORT's CPU flash path
    assert len(mha) == 6 and all(n.domain == "com.microsoft" and len(n.input) == 3 for n in mha)
    ids, mask = _random_batch([37, 20], vocab=30522, seed=5)
    portable = _all_tensor_shapes(m.artifact_path("export:fp32", "onnx"), ids, mask)
    assert any(list(s) == [2, 1, 37, 37] for s in portable.values()), "the check must see the portable mask"
    assert _two_length_axes(_all_tensor_shapes(m.artifact_path("export:fp32", "onnx-cpu"), ids, mask), 37) == []


@pytest.mark.parametrize("side", ["right", "left"])
def test_minilm_cpu_form_matches_the_portable_form(minilm_artifact, side):
    """Same ids and mask into both forms; left padding puts whole key tiles of padding first on the flash path."""
    ids, mask = _random_batch([300, 211, 64, 9, 1], vocab=30522, seed=11, side=side)
    m = Manifest.load(minilm_artifact)
    embs = []
    for kind in ("onnx", "onnx-cpu"):
        with OrtRunner(m.artifact_path("export:fp32", kind)) as r:
            embs.append(r.infer(ids, mask))
    assert row_cosine(*embs).min() >= 0.99999


def test_minilm_validation_covers_the_cpu_form(minilm_artifact):
    v = Manifest.load(minilm_artifact).stage("export:fp32").figures["validation"]
    for key in ("right_padding", "left_padding", "cpu_form_right_padding", "cpu_form_left_padding"):
        assert v[key]["min_cosine"] >= 0.99999, key


@pytest.mark.slow
def test_smollm2_matches_torch_at_2048_tokens(smollm2_artifact):
    """Past the spec's max length (512), at 2,048 positions: both forms against transformers (sdpa, padding mask)."""
    ids, mask = _random_batch([2048], vocab=49152, seed=7)
    ref = _torch(smollm2_artifact).infer(ids, mask)
    m = Manifest.load(smollm2_artifact)
    for kind in ("onnx", "onnx-cpu"):
        with OrtRunner(m.artifact_path("export:fp32", kind), intra_op_threads=2) as r:
            cos = row_cosine(ref, r.infer(ids, mask))
        assert cos.min() >= 0.99999, (kind, cos)
