"""Online rotations of the linear inputs (sfr_export.quant.rotation): exact in float, in torch and in the ONNX graph,
on tiny-mistral with injected outlier channels (RMSNorm weights x50) and a massive first token (BOS row x300); and
what they are for: per-token int8 (row8) that the outliers break is recovered once the inputs are rotated."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from sfr_export.models import load_backbone, load_tokenizer
from sfr_export.quant import observe as obs
from sfr_export.quant.qdq import QuantPlan, build_quantized, map_matmuls, read_tensor
from sfr_export.quant.recipe import load_recipe, sample_recipe
from sfr_export.quant.rotation import make_rotation, rotate_model
from sfr_export.vectors import row_cosine
from sfr_export.spec import spec_from_model_dir
from sfr_export.stages.calibrate import QDQ_SESSION_CONFIG, make_batches, torch_embedder
from sfr_export.tokenization import TextTokenizer


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("dim", [64, 100, 576, 1536])
def test_rotation_is_orthogonal_and_cheap(dim):
    rot = make_rotation(dim, seed=3)
    r = rot.apply(np.eye(dim))
    np.testing.assert_allclose(r @ r.T, np.eye(dim), atol=1e-12)
    assert not np.allclose(np.abs(r), np.eye(dim))  # it mixes channels
    assert rot.na * rot.nb == dim and rot.nb == min(64, dim & -dim)
    assert np.array_equal(make_rotation(dim, seed=3).apply(np.eye(dim)), r)  # seeded: linears can share it
    if dim >= 576:
        assert rot.matmul_macs_per_row() <= dim * dim // 6  # Kronecker: far below a dense rotation
    import torch

    x = np.random.default_rng(0).standard_normal((3, 5, dim))
    np.testing.assert_allclose(rot.apply_torch(torch.from_numpy(x)).numpy(), rot.apply(x), atol=1e-12)


@pytest.mark.parametrize("dim, nb", [(576, None), (1536, None), (1536, 32)])
def test_block_only_rotation_is_block_diagonal_and_one_matmul_in_onnx(dim, nb):
    """The fold's down_proj rotation: the block-Hadamard factor alone (optionally in smaller blocks), orthogonal, no
    channel leaves its block, and the ONNX nodes compute what the weights are rotated with."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from sfr_export.quant.rotation import onnx_rotation

    rot = make_rotation(dim, seed=3).block_only(nb)
    assert rot.nb == (nb or 64)
    with pytest.raises(ValueError):
        make_rotation(dim, seed=3).block_only(48)
    r = rot.apply(np.eye(dim))
    np.testing.assert_allclose(r @ r.T, np.eye(dim), atol=1e-12)
    blocks = np.arange(dim) // rot.nb
    assert np.all(r[blocks[:, None] != blocks[None, :]] == 0) and np.count_nonzero(r) == dim * rot.nb
    assert rot.matmul_macs_per_row() == dim * rot.nb
    nodes, inits, out = onnx_rotation("x", rot, "t")
    assert [n.op_type for n in nodes].count("MatMul") == 1 and "Transpose" not in [n.op_type for n in nodes]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, None, dim])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], inits)
    sess = ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)
                                .SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((2, 7, dim)).astype(np.float32)
    np.testing.assert_allclose(sess.run(None, {"x": x})[0], rot.apply(x), atol=1e-5)
    import torch

    np.testing.assert_allclose(rot.apply_torch(torch.from_numpy(x.astype(np.float64))).numpy(), rot.apply(x), atol=1e-12)


@pytest.fixture(scope="module")
def massive_setup(massive_mistral):
    spec = spec_from_model_dir(massive_mistral, "demo:tiny-mistral")
    tt = TextTokenizer(load_tokenizer(massive_mistral), spec)
    cs = sample_recipe(load_recipe("default", samples=16, holdout=24), tt, spec)
    return spec, make_batches(tt, [c.text for c in cs.holdout], 8)


def test_rotated_torch_model_is_exact_in_float(massive_mistral, massive_setup):
    spec, hold = massive_setup
    model = load_backbone(massive_mistral)
    names = list(obs.linear_modules(model))
    embed = torch_embedder(model, spec)
    ref = embed(hold)
    stats, _ = obs.observe(model, [(b.input_ids, b.attention_mask) for b in hold], names, obs.ObserveConfig())
    q_in = stats["layers.0.self_attn.q_proj"].channel_absmax
    assert q_in[[3, 17, 40]].min() > 10 * np.median(q_in)  # the injected outlier channels are there
    rots = rotate_model(model, names)
    assert set(rots) == set(names)
    assert row_cosine(ref, embed(hold)).min() >= 0.99999
    stats_r, _ = obs.observe(model, [(b.input_ids, b.attention_mask) for b in hold], names, obs.ObserveConfig())
    q_rot = stats_r["layers.0.self_attn.q_proj"].channel_absmax
    assert q_rot.max() / np.median(q_rot) < 0.25 * q_in.max() / np.median(q_in)  # spread over the channels


@pytest.fixture(scope="module")
def massive_onnx(massive_mistral, tmp_path_factory):
    from sfr_export.models import resolve_model
    from sfr_export.stages.export import ExportConfig, run_export

    root = tmp_path_factory.mktemp("massive-onnx")
    run_export(root, resolve_model(str(massive_mistral)), ExportConfig(validate=False))
    return root / "onnx" / "fp32" / "model.onnx"


def _ort_embed(path, batches, session_config=None):
    import onnxruntime as ort

    from sfr_export.runtime.ort_int8 import exact_integer_form, exact_session_config, u8s8_saturates

    o = ort.SessionOptions()
    o.intra_op_num_threads = 1
    for k, v in exact_session_config(session_config or {}, u8s8_saturates()).items():
        o.add_session_config_entry(k, v)
    with exact_integer_form(Path(path)) as p:  # u8 weights where this CPU's u8 x s8 GEMM saturates, as the runtime
        s = ort.InferenceSession(str(p), o, providers=["CPUExecutionProvider"])
    out = {}
    for b in batches:
        v = s.run(None, {"input_ids": b.input_ids, "attention_mask": b.attention_mask})[0]
        out.update(zip(b.indices, v))
    return np.stack([out[i] for i in range(len(out))])


def test_rotated_onnx_is_exact_in_float_and_rescues_per_token_int8(massive_mistral, massive_setup, massive_onnx, tmp_path):
    """The graph side: weights rotated one tensor at a time (W R), the online Reshape/MatMul/Transpose/MatMul/Reshape
    before each rotated MatMul; float everywhere it equals the fp32 graph, and per-token int8 is rescued by it."""
    _, hold = massive_setup
    src = massive_onnx
    model = load_backbone(massive_mistral)
    mapping = map_matmuls(onnx.load(str(src), load_external_data=False),
                          {n: tuple(m.weight.shape) for n, m in obs.linear_modules(model).items()})
    inits = {t.name: t for t in onnx.load(str(src), load_external_data=False).graph.initializer}
    rots = {n: make_rotation(int(inits[mapping[n].weight].dims[0])) for n in mapping}
    ref = _ort_embed(src, hold)

    def build(mode, rotations):
        out = tmp_path / f"{mode}-{len(rotations)}.onnx"
        info = build_quantized(src, out, mapping, QuantPlan({n: mode for n in mapping}, {}, rotations=rotations),
                               weight_of=lambda n: (lambda w: rotations[n].apply(w) if n in rotations else w)(
                                   read_tensor(inits[mapping[n].weight], src.parent).T),
                               bias_of=lambda n: None)
        assert info["rotated_matmuls"] == len(rotations)
        return out

    exact = build("float", rots)
    ops = [n.op_type for n in onnx.load(str(exact)).graph.node]
    assert ops.count("Transpose") >= 8  # one online rotation per distinct input (q/k/v share one): 4 per layer
    onnx.checker.check_model(str(exact))  # standard ONNX ops only
    assert row_cosine(ref, _ort_embed(exact, hold)).min() >= 0.99999
    plain = row_cosine(ref, _ort_embed(build("row8", {}), hold))
    rotated = row_cosine(ref, _ort_embed(build("row8", rots), hold))
    print(f"row8 plain cos {plain.mean():.5f} min {plain.min():.5f}; rotated {rotated.mean():.5f} min {rotated.min():.5f}")
    assert 1 - rotated.mean() < 0.5 * (1 - plain.mean())


def test_w8a8_with_rotated_inputs_and_the_first_position_float_is_tensorrt_conformant(massive_mistral, massive_setup,
                                                                                     massive_onnx, tmp_path):
    """--rotation on --prefix-float 1: every W8A8 MatMul is split into a float-activation MatMul on position 0 and a
    per-tensor static Q/DQ MatMul on the rest (same int8 weight), concatenated; standard ONNX, TensorRT's rules."""
    from sfr_export.tensorrt.qdq_check import check_qdq
    from sfr_export.quant.qdq import w8a8_mac_share

    _, hold = massive_setup
    src = massive_onnx
    model = load_backbone(massive_mistral)
    names = list(obs.linear_modules(model))
    mapping = map_matmuls(onnx.load(str(src), load_external_data=False),
                          {n: tuple(m.weight.shape) for n, m in obs.linear_modules(model).items()})
    rots = rotate_model(model, names)  # the torch model now holds W R; its rotated inputs give the ranges
    _, thr = obs.observe(model, [(b.input_ids, b.attention_mask) for b in hold], names, obs.ObserveConfig(skip_prefix=1))
    out = tmp_path / "w8a8.onnx"
    mods = obs.linear_modules(model)
    build_quantized(src, out, mapping, QuantPlan({n: "w8a8" for n in mapping}, thr, rotations=rots, prefix_float=1),
                    weight_of=lambda n: mods[n].weight.detach().numpy(), bias_of=lambda n: None)
    report = check_qdq(out)
    assert report, report.summary()
    assert w8a8_mac_share(out)["w8a8_mac_share"] == 1.0
    m = onnx.load(str(out))
    producers = {o: n for n in m.graph.node for o in n.output}
    qs = [n for n in m.graph.node if n.op_type == "QuantizeLinear"]
    assert qs and all(producers[q.input[0]].op_type == "Slice" for q in qs)  # position 0 never quantized
    concats = [n for n in m.graph.node if n.op_type == "Concat" and n.name.endswith("_concat")]
    assert len(concats) == len(mapping)
    for c in concats:
        head, tail = (producers[i] for i in c.input)
        assert head.op_type == tail.op_type == "MatMul" and head.input[1] == tail.input[1]  # one int8 weight
    ref = _ort_embed(src, hold)
    assert row_cosine(ref, _ort_embed(out, hold)).mean() > 0.99  # runs, and is the same model up to int8 error


def test_w8a8_pooled_rows_float_is_what_the_torch_search_measures(massive_mistral, massive_setup, massive_onnx,
                                                                  tmp_path):
    """pooled_float (last-token models): in every W8A8 MatMul each text's pooled row skips Q/DQ (GatherND, a float
    MatMul on B rows through the same dequantized int8 weight, ScatterND). The graph stays TensorRT-conformant and
    all-W8A8 by multiply-adds, ONNX Runtime computes what the torch search's fake quantization computes, and the
    embedding (that row, pooled) moves closer to float than without it."""
    from sfr_export.quant.qdq import w8a8_mac_share
    from sfr_export.quant.sensitivity import fake_quant
    from sfr_export.tensorrt.qdq_check import check_qdq

    spec, hold = massive_setup
    model = load_backbone(massive_mistral)
    names = list(obs.linear_modules(model))
    embed = torch_embedder(model, spec)
    ref = embed(hold)
    mapping = map_matmuls(onnx.load(str(massive_onnx), load_external_data=False),
                          {n: tuple(m.weight.shape) for n, m in obs.linear_modules(model).items()})
    rots = rotate_model(model, names)
    _, thr = obs.observe(model, [(b.input_ids, b.attention_mask) for b in hold], names, obs.ObserveConfig(skip_prefix=1))
    mods, modes = obs.linear_modules(model), {n: "w8a8" for n in names}
    outs = {}
    for pooled in (False, True):
        outs[pooled] = tmp_path / f"w8a8-pooled-{pooled}.onnx"
        build_quantized(massive_onnx, outs[pooled], mapping,
                        QuantPlan(modes, thr, rotations=rots, prefix_float=1, pooled_float=pooled),
                        weight_of=lambda n: mods[n].weight.detach().numpy(), bias_of=lambda n: None)
    report = check_qdq(outs[True])
    assert report, report.summary()
    assert w8a8_mac_share(outs[True]) == {"linears": len(mapping), "w8a8_mac_share": 1.0}
    nodes = onnx.load(str(outs[True])).graph.node
    scatters = [n for n in nodes if n.op_type == "ScatterND"]
    assert len(scatters) == len(mapping) and [n.name for n in nodes].count("sfr_pi_Last") == 1  # one index
    ort_cos, torch_cos = {}, {}
    for pooled in (False, True):
        got = _ort_embed(outs[pooled], hold, QDQ_SESSION_CONFIG)  # as the build measures and serves it
        with fake_quant(model, modes, thr, prefix=1, pooled=pooled):
            fake = embed(hold)
        same = row_cosine(fake, got)
        # the search's arithmetic is the graph's: most texts agree to float precision; the online rotation's float
        # rounding can flip an int8 rounding at a .5 boundary, which moves a text by less than 1e-3
        assert np.median(same) > 0.999999 and same.min() > 0.999
        ort_cos[pooled], torch_cos[pooled] = row_cosine(ref, got).mean(), row_cosine(ref, fake).mean()
    print(f"W8A8 cos vs float: plain {ort_cos[False]:.5f}, pooled rows float {ort_cos[True]:.5f}")
    assert 1 - ort_cos[True] < 1 - ort_cos[False]
