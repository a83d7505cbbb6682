"""The residual-stream fold (sfr_export.quant.fold) on tiny-mistral with two massive residual channels (the embedding
table's columns 5 and 9 x100, every norm's scale there x0.01, as real decoders shrink their massive channels): exact
in float in the ONNX graph; the massive channels are found; and per-token int8 of the folded graph, which those
channels break, is recovered by keeping them float."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from sfr_export.models import load_backbone, load_tokenizer
from sfr_export.quant import fold as fd
from sfr_export.quant import observe as obs
from sfr_export.quant.qdq import map_matmuls
from sfr_export.quant.recipe import load_recipe, sample_recipe
from sfr_export.spec import spec_from_model_dir
from sfr_export.stages.export import plan_attention_from_dir
from sfr_export.stages.calibrate import CpuCandidate, cpu_candidates, fold_down_block, make_batches, write_cpu_candidate
from sfr_export.tokenization import TextTokenizer
from sfr_export.vectors import row_cosine

from test_calibrate_rotation import _ort_embed  # noqa: E402  (the tests dir is on sys.path)

pytestmark = pytest.mark.usefixtures("one_torch_thread")
MASSIVE = (5, 9)


@pytest.fixture(scope="module")
def channel_mistral(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from safetensors.torch import load_file, save_file

    from sfr_export.models.demo import materialize_demo

    d = tmp_path_factory.mktemp("channels") / "tiny-mistral-channels"
    shutil.copytree(materialize_demo("demo:tiny-mistral"), d)
    sd = load_file(str(d / "model.safetensors"))
    for name in list(sd):
        w = sd[name].clone()
        if name == "embed_tokens.weight":
            w[:, list(MASSIVE)] *= 100.0
        elif name.endswith("layernorm.weight"):
            w[list(MASSIVE)] *= 0.01
        sd[name] = w
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((d / "config.json").read_text())
    cfg["_sfr_export_known_as"] = "demo:tiny-mistral"
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.fixture(scope="module")
def setup(channel_mistral, tmp_path_factory):
    from sfr_export.models import resolve_model
    from sfr_export.stages.export import ExportConfig, run_export

    root = tmp_path_factory.mktemp("channels-onnx")
    run_export(root, resolve_model(str(channel_mistral)), ExportConfig(validate=False))
    src = root / "onnx" / "fp32" / "model.onnx"
    spec = spec_from_model_dir(channel_mistral, "demo:tiny-mistral")
    tt = TextTokenizer(load_tokenizer(channel_mistral), spec)
    cs = sample_recipe(load_recipe("default", samples=16, holdout=24), tt, spec)
    model = load_backbone(channel_mistral)
    mapping = map_matmuls(onnx.load(str(src), load_external_data=False),
                          {n: tuple(m.weight.shape) for n, m in obs.linear_modules(model).items()})
    return src, plan_attention_from_dir(channel_mistral), mapping, model, make_batches(tt, [c.text for c in cs.calibration], 8), \
        make_batches(tt, [c.text for c in cs.holdout], 8)


def _write(setup, tmp_path, mode: str, keep: tuple[int, ...], name: str, moments=None, down_block: int = 64) -> Path:
    return _write_with_figures(setup, tmp_path, mode, keep, name, moments, down_block)[0]


def _write_with_figures(setup, tmp_path, mode, keep, name, moments=None, down_block=64) -> tuple[Path, dict]:
    """One folded candidate, as the stage writes it (a float graph, as read for GPTQ's moments, keeps every row of
    its last layer)."""
    src, attention, mapping, _, _, _ = setup
    fold = fd.plan_residual_fold(onnx.load(str(src), load_external_data=False), mapping, keep, 0, src.parent)
    modes = {n: mode for n in mapping}
    cand = CpuCandidate(name, modes, frozenset(n for n in modes if n.endswith("down_proj")), fold=True,
                        down_block=down_block)
    out = tmp_path / name / "model.onnx"
    out.parent.mkdir(parents=True, exist_ok=True)
    _, built = write_cpu_candidate(src, out, mapping, cand, seed=0, attention=attention, fold=fold, moments=moments,
                                   pooled_tail=mode != "float")
    return out, built


def test_the_massive_channels_are_found(setup):
    _, _, _, model, calib, _ = setup
    assert fd.massive_channels(model, calib, 2) == MASSIVE


@pytest.mark.parametrize("keep", [(), MASSIVE])
def test_the_folded_graph_is_exact_in_float(setup, tmp_path, keep):
    """E Q, Q^T W (writers), W diag(g) Q (readers, the kept scale on the norm), x Q^T before the final scale, and the
    online rotation left at down_proj: the same model, in standard ONNX."""
    src, _, _, _, _, hold = setup
    out = _write(setup, tmp_path, "float", keep, "float")
    onnx.checker.check_model(str(out))
    nodes = onnx.load(str(out)).graph.node
    assert sum(n.name.endswith("_premul") for n in nodes) == 1  # the final norm's rotation back
    assert row_cosine(_ort_embed(src, hold), _ort_embed(out, hold)).min() >= 0.99999


def test_a_last_token_fold_rotates_down_proj_in_16_channel_blocks_exact_in_float(setup, tmp_path):
    """Where each text's first and pooled rows get a second digit, down_proj's online block-Hadamard runs in blocks
    of 16 channels (a quarter of 64's multiply-adds, as faithful on real SmolLM2: docs/int8.md); the folded graph
    is still the same model in float."""
    src, _, mapping, _, _, hold = setup
    cand = next(c for c in cpu_candidates(list(mapping), {}, set(), last_token=True) if c.fold)
    assert cand.first_exact and cand.down_block == fold_down_block(True) == 16 and fold_down_block(False) == 64
    out = _write(setup, tmp_path, "float", MASSIVE, "float-block16", down_block=16)
    m = onnx.load(str(out))
    inits = {t.name: t for t in m.graph.initializer}
    blocks = [tuple(inits[n.input[1]].dims) for n in m.graph.node if n.name.endswith("_rot_Hadamard")]
    assert blocks and set(blocks) == {(16, 16)}
    assert row_cosine(_ort_embed(src, hold), _ort_embed(out, hold)).min() >= 0.99999


def test_the_float_channel_split_is_exact(setup, tmp_path):
    """row8 with every channel float: the int8 path sees zeros, the float MatMul carries everything."""
    src, _, mapping, _, _, hold = setup
    dim = int({t.name: t for t in onnx.load(str(src), load_external_data=False).graph.initializer}[
        mapping["layers.0.mlp.down_proj"].weight].dims[1])
    out = _write(setup, tmp_path, "row8", tuple(range(dim)), "all-float")
    ops = [n.op_type for n in onnx.load(str(out)).graph.node]
    assert ops.count("Gather") >= 1 + 2 * 2  # the embedding, then one split per norm output (2 per layer)
    assert row_cosine(_ort_embed(src, hold), _ort_embed(out, hold)).min() >= 0.99999


def test_float_channels_rescue_per_token_int8_of_the_folded_graph(setup, tmp_path):
    src, _, _, _, _, hold = setup
    ref = _ort_embed(src, hold)
    plain = row_cosine(ref, _ort_embed(_write(setup, tmp_path, "row8", (), "plain"), hold))
    kept = row_cosine(ref, _ort_embed(_write(setup, tmp_path, "row8", MASSIVE, "kept"), hold))
    print(f"row8 folded: 1 - cos {1 - plain.mean():.3e}; massive channels float: {1 - kept.mean():.3e}")
    assert 1 - kept.mean() < 0.5 * (1 - plain.mean())


def test_the_last_token_candidate_runs_its_tail_on_the_pooled_rows_with_the_same_embeddings(setup, tmp_path):
    """The folded candidate of a last-token model (the second digit on each text's pooled and first rows): with the
    last layer's tail on the pooled rows alone, its embeddings are those it gives with every row (the digit's row
    indices follow the tail); right-padded held-out batches."""
    src, attention, mapping, _, _, hold = setup
    cand = next(c for c in cpu_candidates(list(mapping), {}, set(), last_token=True) if c.fold)
    assert cand.pooled_exact and cand.first_exact
    fold = fd.plan_residual_fold(onnx.load(str(src), load_external_data=False), mapping, MASSIVE, 0, src.parent)
    outs = {}
    for tail in (False, True):
        outs[tail] = tmp_path / f"tail-{tail}" / "model.onnx"
        outs[tail].parent.mkdir(parents=True)
        write_cpu_candidate(src, outs[tail], mapping, cand, seed=0, attention=attention, fold=fold, pooled_tail=tail)
    ops = {t: [n.op_type for n in onnx.load(str(p), load_external_data=False).graph.node] for t, p in outs.items()}
    assert "GatherElements" in ops[False] and "GatherElements" not in ops[True]
    np.testing.assert_allclose(_ort_embed(outs[True], hold), _ort_embed(outs[False], hold), rtol=0, atol=1e-6)


def test_the_fold_refuses_an_encoder():
    from sfr_export.errors import CalibrationError

    with pytest.raises(CalibrationError, match="residual fold needs a decoder"):
        fd.fold_linears({"encoder.layer.0.attention.self.query": None})


def test_the_residual_rotation_is_orthogonal_and_leaves_the_kept_channels_alone():
    q = fd.residual_rotation(8, (2, 5), 0)
    np.testing.assert_allclose(q @ q.T, np.eye(8), atol=1e-12)
    assert np.array_equal(q[[2, 5]], np.eye(8)[[2, 5]]) and np.array_equal(q[:, [2, 5]], np.eye(8)[:, [2, 5]])
    assert not np.allclose(np.abs(q), np.eye(8))  # it mixes the other channels


def test_gptq_rounding_of_the_folded_form_lowers_its_error(setup, tmp_path):
    """GPTQ on the folded float graph's MatMul input moments (calibration texts): the same graph and scales as
    round-to-nearest with other integers, a smaller output error on every weight (its objective), and embeddings
    closer to the fp32 graph's on the held-out texts (random weights: no claim about a real model's size of gain)."""
    from sfr_export.quant.gptq import input_moments
    from sfr_export.stages.calibrate import CPU_SESSION_CONFIG, matmul_inputs

    src, _, mapping, _, calib, hold = setup
    float_graph = _write(setup, tmp_path, "float", MASSIVE, "float")
    inputs = matmul_inputs(float_graph, src, mapping)
    assert inputs["layers.0.mlp.down_proj"][0] != mapping["layers.0.mlp.down_proj"].activation  # rotated online
    store = input_moments(float_graph, inputs, calib, CPU_SESSION_CONFIG, tmp_path / "moments")
    assert len(store) == len(mapping) and store.tokens == sum(int(b.attention_mask.sum()) for b in calib)
    nearest, _ = _write_with_figures(setup, tmp_path, "row8", MASSIVE, "nearest")
    gptq, built = _write_with_figures(setup, tmp_path, "row8", MASSIVE, "gptq", moments=store)
    assert built["gptq"]["weights"] == len(mapping) and built["gptq"]["output_error_vs_nearest_max"] < 1.0
    a, b = onnx.load(str(nearest)).graph, onnx.load(str(gptq)).graph
    assert [n.op_type for n in a.node] == [n.op_type for n in b.node]
    ia, ib = {t.name: onnx.numpy_helper.to_array(t) for t in a.initializer}, {t.name: onnx.numpy_helper.to_array(t) for t in b.initializer}
    scales = [k for k in ia if k.endswith("_r8_scale")]
    assert scales and all(np.array_equal(ia[k], ib[k]) for k in scales)
    assert any(not np.array_equal(ia[k[: -len("_scale")]], ib[k[: -len("_scale")]]) for k in scales)
    ref = _ort_embed(src, hold)
    err_nearest = 1 - row_cosine(ref, _ort_embed(nearest, hold)).mean()
    err_gptq = 1 - row_cosine(ref, _ort_embed(gptq, hold)).mean()
    print(f"row8 folded, held-out 1 - cos: nearest {err_nearest:.3e}, GPTQ {err_gptq:.3e}; "
          f"output error vs nearest, median {built['gptq']['output_error_vs_nearest_median']:.3f}")
    assert err_gptq < err_nearest
