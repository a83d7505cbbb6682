"""The int8 artifacts of `sfr-export build --precision int8` on demo:tiny-mistral: Q/DQ structure, manifest, runtime."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from sfr_export.errors import CalibrationError
from sfr_export.artifact import Manifest
from sfr_export.quant.qdq import map_matmuls, qdq_summary


def test_manifest_records_both_int8_variants(tiny_int8):
    m = Manifest.load(tiny_int8)
    for name, variant in (("calibrate:int8", "int8"), ("calibrate:int8-cpu", "int8-cpu")):
        rec = m.stage(name)
        assert rec is not None and rec.config["variant"] == variant
        assert rec.status == "ok", rec.reason
        assert any(a.kind == "onnx" for a in rec.artifacts)
        assert rec.figures["fidelity"]["cos_mean"] >= 0.995 and rec.figures["fidelity"]["met"]
        m.verify_stage(name)
    q = m.stage("calibrate:int8")
    assert q.config["ort_session_config"] == {"session.qdq_matmulnbits_accuracy_level": "0"}
    assert q.config["smoothquant"] == "off" and "smoothquant" not in q.figures  # the default (fold: outlier tests)
    assert q.figures["sample"]["calibration"]["texts"] > 0
    assert q.config["weight_rounding"] == "gptq"  # the default: every int8 weight GPTQ-rounded, none worse than nearest
    assert q.figures["build"]["gptq"]["weights"] == sum(c for mode, c in q.figures["build"]["matmuls"].items() if mode != "float")
    assert q.figures["build"]["gptq"]["output_error_vs_nearest_max"] <= 1.0


def test_qdq_graph_structure(tiny_int8):
    path = tiny_int8 / "onnx" / "int8" / "model.onnx"
    m = onnx.load(str(path))
    s = qdq_summary(path)
    assert s["domains"] == ["ai.onnx"]  # standard ONNX ops only (TensorRT form)
    assert s["zero_points_all_zero"]  # symmetric, int8 zero points
    inits = {t.name: t for t in m.graph.initializer}
    producers = {o: n for n in m.graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in m.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    weights_dequantized: set[str] = set()
    for n in m.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            # Q/DQ only on MatMul inputs: every DQ output feeds MatMuls only
            if n.op_type == "DequantizeLinear":
                assert {c.op_type for c in consumers[n.output[0]]} == {"MatMul"}, n.name
            else:
                assert {c.op_type for c in consumers[n.output[0]]} == {"DequantizeLinear"}
                assert len(inits[n.input[1]].dims) == 0  # activations: one per-tensor scale
        if n.op_type != "MatMul":
            continue
        b = producers.get(n.input[1])
        if b is None or b.op_type != "DequantizeLinear":
            continue
        weights_dequantized.add(b.name)
        q = inits[b.input[0]]
        assert q.data_type == onnx.TensorProto.INT8 and len(q.dims) == 2
        axis = next(a.i for a in b.attribute if a.name == "axis")
        scale = numpy_helper.to_array(inits[b.input[1]])
        assert axis == 1 and scale.shape == (q.dims[1],) and (scale > 0).all()  # per output channel
        assert np.abs(numpy_helper.to_array(q)).max() <= 127  # symmetric: -128 never used
    assert len(weights_dequantized) == 14  # every linear of the 2-layer model; attention score MatMuls stay float
    # nothing quantizes the attention mask or position math
    mask_consumers = {c.op_type for c in consumers["attention_mask"]}
    assert not mask_consumers & {"QuantizeLinear", "DequantizeLinear"}
    modes = Manifest.load(tiny_int8).stage("calibrate:int8").figures["mixed_precision"]["modes"]
    assert len(s["quantize_activation"]) >= 1 and modes.get("w8a8", 0) >= 1
    from sfr_export.tensorrt.qdq_check import check_qdq

    report = check_qdq(path)
    assert report, report.summary()


def test_int8_runs_through_the_embedder(tiny_int8):
    from sfr_export.runtime import Embedder

    texts = ["how does the virus enter human cells?", "A man is playing a guitar."]
    with Embedder.from_artifact(tiny_int8, backend="onnxruntime", variant="fp32") as ref, \
         Embedder.from_artifact(tiny_int8, backend="onnxruntime", variant="int8") as q, \
         Embedder.from_artifact(tiny_int8, backend="onnxruntime", variant="int8-cpu") as c:
        a, b, d = ref.encode(texts), q.encode(texts), c.encode(texts)
        assert q.runner.session_config == {"session.qdq_matmulnbits_accuracy_level": "0"}
    assert (a * b).sum(1).min() > 0.99 and (a * d).sum(1).min() > 0.99


def test_cpu_form_keeps_fused_attention_past_the_window(tiny_int8):
    """The int8-cpu graph runs attention as GroupQueryAttention (as the fp32 CPU form), recorded in the manifest,
    and stays close to fp32 on a text longer than tiny-mistral's 32-token sliding window."""
    from sfr_export.runtime import Embedder

    ops = [n.op_type for n in onnx.load(str(tiny_int8 / "onnx" / "int8-cpu" / "model.onnx")).graph.node]
    assert ops.count("GroupQueryAttention") == 2 and "Attention" not in ops and "Softmax" not in ops
    assert Manifest.load(tiny_int8).stage("calibrate:int8-cpu").figures["attention"] == "com.microsoft.GroupQueryAttention"
    long_text = " ".join(f"word{i} follows" for i in range(60))  # well past 32 tokens
    with Embedder.from_artifact(tiny_int8, backend="onnxruntime", variant="fp32") as ref, \
         Embedder.from_artifact(tiny_int8, backend="onnxruntime", variant="int8-cpu") as c:
        texts = [long_text, "short one"]
        assert (ref.encode(texts) * c.encode(texts)).sum(1).min() > 0.99


def test_cpu_form_is_not_qdq_compatible_input(tiny_int8):
    m = onnx.load(str(tiny_int8 / "onnx" / "int8-cpu" / "model.onnx"))
    assert any(n.op_type in ("MatMulNBits", "MatMulIntegerToFloat") for n in m.graph.node)
    with pytest.raises(CalibrationError, match="not Q/DQ-compatible"):
        map_matmuls(m, {"layers.0.self_attn.q_proj": (64, 64)})


def test_unreachable_target_fails_and_leaves_no_partial_artifact(tiny_int8, tmp_path):
    from sfr_export.cli import main

    root = tmp_path / "copy"
    shutil.copytree(tiny_int8, root)
    before = json.loads((root / "manifest.json").read_text())["stages"]["calibrate:int8"]
    with pytest.raises(SystemExit) as exc:
        main(["calibrate", str(root), "--target-cosine", "0.9999999", "--max-float-fraction", "0", "--no-cpu-form",
              "--samples", "16", "--holdout", "8", "--pairs", "40", "--force"])
    assert exc.value.code == 1
    after = json.loads((root / "manifest.json").read_text())["stages"]["calibrate:int8"]
    assert after == before  # the previous artifact and its record are untouched
    Manifest.load(root).verify_stage("calibrate:int8")
    assert not list((root / "onnx").glob(".*tmp*"))


def test_bad_method_is_a_clear_error(tiny_int8, capsys):
    from sfr_export.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["calibrate", str(tiny_int8), "--method", "kl"])
    assert exc.value.code == 2
    assert "unknown calibration method 'kl'" in capsys.readouterr().err


def test_cpu_form_keeps_the_fastest_candidate_that_meets_the_targets(tiny_int8):
    rec = Manifest.load(tiny_int8).stage("calibrate:int8-cpu")
    tries = rec.figures["tries"]
    assert tries and tries[-1]["met"] and not any(t["met"] for t in tries[:-1])
    assert rec.figures["chosen"] == tries[-1]["candidate"] and tries[0]["candidate"] == "row8"
    ops = [n.op_type for n in onnx.load(str(tiny_int8 / "onnx" / "int8-cpu" / "model.onnx")).graph.node]
    modes = list(rec.figures["per_matmul"].values())
    assert len(modes) == 14
    assert ops.count("MatMulIntegerToFloat") == modes.count("row8") and ops.count("MatMulNBits") == modes.count("nbits8")


def test_nbits8_form_equals_ort_matmulnbits_quantizer(tiny_int8, tmp_path):
    """The streamed nbits8 form (one weight at a time through ORT's own packer) is exactly what ORT's
    MatMulNBitsQuantizer makes from the whole fp32 model: same nodes, same outputs."""
    import onnxruntime as ort
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from sfr_export.quant.qdq import QuantPlan, build_quantized, read_tensor

    src = tiny_int8 / "onnx" / "fp32" / "model.onnx"
    mapping = _tiny_mapping(src)
    inits = {t.name: t for t in onnx.load(str(src), load_external_data=False).graph.initializer}
    ours = tmp_path / "ours.onnx"
    build_quantized(src, ours, mapping, QuantPlan({n: "nbits8" for n in mapping}, {}),
                    weight_of=lambda n: read_tensor(inits[mapping[n].weight], src.parent).T, bias_of=lambda n: None)
    q = MatMulNBitsQuantizer(onnx.load(str(src)), bits=8, block_size=32, is_symmetric=True, accuracy_level=4)
    q.process()
    q.model.save_model_to_file(str(tmp_path / "ort.onnx"))
    count = [sum(n.op_type == "MatMulNBits" for n in onnx.load(str(p)).graph.node) for p in (ours, tmp_path / "ort.onnx")]
    assert count[0] == count[1] == 14
    ids = np.random.default_rng(0).integers(5, 900, (2, 24)).astype(np.int64)
    outs = []
    for p in (ours, tmp_path / "ort.onnx"):
        s = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
        outs.append(s.run(None, {i.name: (ids if "ids" in i.name else np.ones_like(ids)) for i in s.get_inputs()})[0])
    np.testing.assert_array_equal(outs[0], outs[1])


def _tiny_mapping(src):
    import torch

    from sfr_export.models import load_backbone

    m = Manifest.load(src.parents[2])
    lin = {n: tuple(mod.weight.shape) for n, mod in load_backbone(m.model["local_dir"]).named_modules()
           if isinstance(mod, torch.nn.Linear)}
    return map_matmuls(onnx.load(str(src), load_external_data=False), lin)


@pytest.mark.parametrize("opset", [18, 23], ids=["Div+QuantizeLinear", "blocked QuantizeLinear"])
def test_row8_matmul_is_per_token_symmetric_int8(tmp_path, opset):
    """row8 = activation rows quantized symmetric int8 at run time (scale max|row|/127), weight columns per channel,
    int32 accumulation: ONNX Runtime's output equals that arithmetic done in numpy; an all-zero row stays zero. From
    opset 21 one blocked QuantizeLinear (a block per row) does the division, below it a Div."""
    from onnx import TensorProto, helper

    from sfr_export.quant.observe import quantize_weight
    from sfr_export.quant.qdq import MatMulInfo, QuantPlan, build_quantized

    rng = np.random.default_rng(0)
    k, n = 64, 48
    w = rng.normal(0, 0.05, (k, n)).astype(np.float32)  # ONNX B: [in, out]
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "L", k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "L", n])],
                          [numpy_helper.from_array(w, "w")])
    src = tmp_path / "mm.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)]), str(src))
    out = tmp_path / "row8.onnx"
    build_quantized(src, out, {"lin": MatMulInfo("lin", "mm", "w", "x")}, QuantPlan({"lin": "row8"}, {}),
                    weight_of=lambda _: w.T, bias_of=lambda _: None)
    ops = {nd.op_type for nd in onnx.load(str(out)).graph.node}
    assert ("Div" in ops) == (opset < 21)
    x = rng.normal(0, 1, (2, 5, k)).astype(np.float32)
    x[0, 1, 3] = 40.0  # an outlier inflates only its own row's scale
    x[1, 2] = 0.0
    y = _run(out, {"x": x})[0]
    sx = np.maximum(np.abs(x).max(-1, keepdims=True) / 127, 1e-30)
    qx = np.clip(np.rint(x / sx), -127, 127)
    qw, sw = quantize_weight(w, axis=1)
    ref = (qx.astype(np.float64) @ qw.astype(np.float64)) * sx * sw
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)
    assert np.all(y[1, 2] == 0) and np.isfinite(y).all()
    assert np.abs(y - x @ w).max() < 0.05 * np.abs(x @ w).max()


def _run(path, feeds):
    """Run on ORT's CPU provider as the runtime does: with u8 weights where this CPU's u8 x s8 GEMM saturates."""
    import onnxruntime as ort

    from sfr_export.runtime.ort_int8 import exact_integer_form

    with exact_integer_form(Path(path)) as p:
        return ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, feeds)


@pytest.mark.parametrize("opset", [18, 23], ids=["Div+QuantizeLinear", "blocked QuantizeLinear"])
def test_row8_pooled_rows_get_a_second_digit(tmp_path, opset):
    """pooled_exact: each text's last attended row (either padding side) is x ~ s (q1 + s2 q2), two int8 digits
    through the same int8 weight, so that row is ~15-bit exact; every other row is plain row8 (either quantizer)."""
    from onnx import TensorProto, helper

    from sfr_export.quant.qdq import MatMulInfo, QuantPlan, build_quantized

    rng = np.random.default_rng(1)
    k, n = 64, 48
    w = rng.normal(0, 0.05, (k, n)).astype(np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),  # two readers of x, as q/k/v
                           helper.make_node("MatMul", ["x", "w2"], ["y2"], name="mm2")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "L", k]),
                           helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["B", "L"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "L", n]),
                           helper.make_tensor_value_info("y2", TensorProto.FLOAT, ["B", "L", n])],
                          [numpy_helper.from_array(w, "w"), numpy_helper.from_array(-w, "w2")])
    src = tmp_path / "mm.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)]), str(src))
    mapping = {"lin": MatMulInfo("lin", "mm", "w", "x"), "lin2": MatMulInfo("lin2", "mm2", "w2", "x")}
    paths = {}
    for exact in (False, True):
        paths[exact] = tmp_path / f"row8_{exact}.onnx"
        build_quantized(src, paths[exact], mapping, QuantPlan({"lin": "row8", "lin2": "row8"}, {}, pooled_exact=exact),
                        weight_of=lambda name: w.T if name == "lin" else -w.T, bias_of=lambda _: None)
    x = rng.normal(0, 1, (3, 6, k)).astype(np.float32)
    x[:, :, 5] *= 30.0  # a channel outlier: coarse per-token scales
    mask = np.array([[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], np.int64)  # right, left, none
    (y0, y0b), (y1, y1b) = (_run(paths[e], {"x": x, "attention_mask": mask}) for e in (False, True))
    readers = [n for n in onnx.load(str(paths[True])).graph.node if n.op_type == "MatMulIntegerToFloat"]
    assert len(readers) == 4 and len({n.input[0] for n in readers}) == 2  # both readers share both digits
    np.testing.assert_allclose(y1b, -y1, atol=1e-6)  # the second reader, with its own weight
    _assert_two_digit_rows(w, x, y0, y1, {0: [3], 1: [5], 2: [5]})


def _assert_two_digit_rows(w, x, y0, y1, rows):
    """Rows ``rows[b]`` of ``y1`` are ~250x nearer float activations through the int8 weight than ``y0``'s (one
    digit); every other row equals ``y0``'s."""
    from sfr_export.quant.observe import quantize_weight

    qw, sw = quantize_weight(w, axis=1)
    exact = x.astype(np.float64) @ (qw.astype(np.float64) * sw)  # float activations, the same int8 weight
    for b, exact_rows in rows.items():
        others = [i for i in range(x.shape[1]) if i not in exact_rows]
        np.testing.assert_array_equal(y1[b, others], y0[b, others])
        for i in exact_rows:
            assert np.abs(y1[b, i] - exact[b, i]).max() < 0.01 * np.abs(y0[b, i] - exact[b, i]).max()


def test_row8_first_rows_get_the_second_digit_too(tmp_path):
    """first_exact: each text's first attended row (the attention sink) gets the second digit as well as its pooled
    row, whatever the padding side; a one-token text's single row gets it once, not twice."""
    from onnx import TensorProto, helper

    from sfr_export.quant.qdq import MatMulInfo, QuantPlan, build_quantized

    rng = np.random.default_rng(2)
    k, n = 64, 48
    w = rng.normal(0, 0.05, (k, n)).astype(np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "L", k]),
                           helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["B", "L"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "L", n])],
                          [numpy_helper.from_array(w, "w")])
    src = tmp_path / "mm.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 23)]), str(src))
    mapping = {"lin": MatMulInfo("lin", "mm", "w", "x")}
    paths = {}
    for first in (False, True):
        paths[first] = tmp_path / f"row8_{first}.onnx"
        build_quantized(src, paths[first], mapping, QuantPlan({"lin": "row8"}, {}, pooled_exact=True, first_exact=first),
                        weight_of=lambda _: w.T, bias_of=lambda _: None)
    x = rng.normal(0, 1, (4, 6, k)).astype(np.float32)
    x[:, :, 5] *= 30.0
    mask = np.array([[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 0, 1, 0, 0, 0]], np.int64)
    (y0,), (y1,) = (_run(paths[f], {"x": x, "attention_mask": mask}) for f in (False, True))
    _assert_two_digit_rows(w, x, y0, y1, {0: [0], 1: [2], 2: [0], 3: []})  # y0 has the pooled rows' digit already
    np.testing.assert_array_equal(y1[3], y0[3])  # the one-token text: its one row not counted twice


def test_smoothquant_on_a_bf16_reference_is_refused(tiny_int8, capsys):
    """The fold check (min cos >= 0.99999 against the unsmoothed model) cannot hold once folded weights are
    re-rounded to bf16, so the combination is refused up front, before any work, and nothing is touched."""
    from sfr_export.cli import main

    before = (tiny_int8 / "manifest.json").read_text()
    with pytest.raises(SystemExit) as exc:
        main(["calibrate", str(tiny_int8), "--smoothquant", "0.5", "--reference-dtype", "bfloat16", "--force"])
    assert exc.value.code == 2
    assert "SmoothQuant needs an fp32 torch reference" in capsys.readouterr().err
    assert (tiny_int8 / "manifest.json").read_text() == before


def test_candidate_below_the_cosine_targets_skips_the_scored_pairs(tiny_int8):
    """The CPU search measures held-out cosine first: a candidate that already fails it is not run on the pairs."""
    from types import SimpleNamespace

    from sfr_export.artifact import load_spec
    from sfr_export.models import load_tokenizer
    from sfr_export.quant.sensitivity import Targets
    from sfr_export.stages.calibrate import CPU_SESSION_CONFIG, _measure, _ort_embed, make_batches
    from sfr_export.tokenization import TextTokenizer

    spec = load_spec(tiny_int8)
    tt = TextTokenizer(load_tokenizer(tiny_int8 / "tokenizer"), spec)
    path = tiny_int8 / "onnx" / "int8-cpu" / "model.onnx"
    hold = make_batches(tt, [f"held-out text number {i}" for i in range(6)], 4)
    pairs = make_batches(tt, [f"pair side {i}" for i in range(8)], 4)
    gold = np.arange(4, dtype=float)
    own, own_pairs = _ort_embed(path, CPU_SESSION_CONFIG, hold), _ort_embed(path, CPU_SESSION_CONFIG, pairs)
    far = np.roll(own, 1, axis=1)  # a reference the candidate is nowhere near
    f = _measure(path, CPU_SESSION_CONFIG, SimpleNamespace(ref=far, pairs_ref=own_pairs), hold, pairs, gold, Targets())
    assert not f["met"] and f["spearman_delta"] is None and "skipped" in f["measured_on"]
    f = _measure(path, CPU_SESSION_CONFIG, SimpleNamespace(ref=own, pairs_ref=own_pairs), hold, pairs, gold, Targets())
    assert f["met"] and f["spearman_delta"] == 0.0 and f["cos_mean"] > 0.9999
