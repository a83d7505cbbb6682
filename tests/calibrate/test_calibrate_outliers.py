"""SmoothQuant equivalence and the outlier-model recovery (tiny Mistral with RMSNorm weights x50).

Fake quantization in torch uses the exact arithmetic of the ONNX Q/DQ graph (symmetric int8, zero point 0,
round-half-even, the same scales), so these are the int8 model's numbers without an ORT session per config.
"""

from __future__ import annotations

import numpy as np
import pytest

from sfr_export.vectors import row_cosine

from sfr_export.models import load_backbone, load_tokenizer
from sfr_export.quant import observe as obs
from sfr_export.quant import sensitivity as sens
from sfr_export.quant import smoothquant as sq
from sfr_export.quant.recipe import load_recipe, sample_recipe
from sfr_export.spec import spec_from_model_dir
from sfr_export.stages.calibrate import make_batches, torch_embedder
from sfr_export.tokenization import TextTokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


TARGETS = sens.Targets(cos_mean=0.995, cos_p1=0.98, spearman_delta=100.0)  # cosine targets only: a random model has no task score


@pytest.fixture(scope="module")
def outlier_setup(outlier_mistral):
    spec = spec_from_model_dir(outlier_mistral, "demo:tiny-mistral")
    tt = TextTokenizer(load_tokenizer(outlier_mistral), spec)
    cs = sample_recipe(load_recipe("default", samples=32, holdout=24), tt, spec)
    calib = make_batches(tt, [c.text for c in cs.calibration], 8)
    hold = make_batches(tt, [c.text for c in cs.holdout], 8)
    model = load_backbone(outlier_mistral)
    names = list(obs.linear_modules(model))
    ev = sens.Evaluator(embed=torch_embedder(model, spec), holdout_batches=hold)
    ev.reference()
    stats, thr = obs.observe(model, [(b.input_ids, b.attention_mask) for b in calib], names, obs.ObserveConfig())
    return model, names, ev, stats, thr, calib, hold


def test_outliers_break_naive_w8a8_and_smoothquant_plus_mixed_precision_recovers(outlier_setup):
    model, names, ev, stats, thr, calib, hold = outlier_setup
    # the injected channels really are outliers at the q/k/v and gate/up inputs
    q_in = stats["layers.0.self_attn.q_proj"].channel_absmax
    assert q_in[[3, 17, 40]].min() > 10 * np.median(q_in)
    # the cheap per-layer sensitivity (used above 64 linears) points at the layers reading the outlier channels
    local = sens.local_sensitivity(model, names, thr, {n: st.sample() for n, st in stats.items()}, "w8a8")
    assert not max(local, key=local.get).endswith("o_proj"), local  # o_proj reads no amplified channel
    for n in ("q_proj", "k_proj", "v_proj"):
        assert local[f"layers.0.self_attn.{n}"] > 3 * local["layers.0.self_attn.o_proj"], local
    naive = ev(model, {n: "w8a8" for n in names}, thr)
    assert not TARGETS.met(naive), naive
    assert naive.cos_mean < 0.99

    report = sq.smooth_model(model, stats, "auto")
    assert report["applied"] >= 4
    fold = sens.fidelity(ev.ref, ev.embed(hold))
    assert fold.cos_min >= 0.99999  # the fold is exact in fp32
    _, thr_s = obs.observe(model, [(b.input_ids, b.attention_mask) for b in calib], names, obs.ObserveConfig())
    smoothed_all = ev(model, {n: "w8a8" for n in names}, thr_s)
    assert smoothed_all.cos_mean > naive.cos_mean
    sel = sens.choose_modes(model, names, thr_s, ev, TARGETS)
    assert sel.met and TARGETS.met(sel.fidelity)
    assert any(m == "w8a8" for m in sel.modes.values())  # W8A8 kept where it is safe
    for n, m in sel.modes.items():
        if m != "w8a8":
            assert n in sel.float_reasons


def _small_setup(model_dir):
    """A tiny Mistral dir's spec, tokenizer, 16 + 16 sampled texts (batched), torch model and linear names."""
    spec = spec_from_model_dir(model_dir, "demo:tiny-mistral")
    tt = TextTokenizer(load_tokenizer(model_dir), spec)
    cs = sample_recipe(load_recipe("default", samples=16, holdout=16), tt, spec)
    model = load_backbone(model_dir)
    calib = make_batches(tt, [c.text for c in cs.calibration], 8)
    hold = make_batches(tt, [c.text for c in cs.holdout], 8)
    return spec, tt, cs, model, list(obs.linear_modules(model)), calib, hold


def test_smoothquant_fold_is_equivalent_for_a_fixed_alpha(outlier_mistral):
    spec, _, _, model, names, calib, hold = _small_setup(outlier_mistral)
    embed = torch_embedder(model, spec)
    ref = embed(hold)
    stats, _ = obs.observe(model, [(b.input_ids, b.attention_mask) for b in calib], names, obs.ObserveConfig())
    w_before = model.layers[0].mlp.down_proj.weight.detach().clone()
    rep = sq.smooth_model(model, stats, 0.5)
    kinds = {g.producer.rsplit(".", 1)[-1] for g in sq.fold_groups(model)}
    assert kinds == {"input_layernorm", "post_attention_layernorm", "up_proj", "v_proj"}  # incl. GQA v -> o
    assert rep["applied"] == rep["groups"] == 8
    assert not np.allclose(w_before.numpy(), model.layers[0].mlp.down_proj.weight.detach().numpy())
    assert row_cosine(ref, embed(hold)).min() >= 0.99999


def test_the_search_scores_the_pairs_once_for_the_form_it_keeps():
    """Each scored pass embeds every held-out pair text (real SmolLM2: ~2,760 texts, minutes in torch): the search
    runs on cosine alone and scores only the W8A8 form it keeps, not weight-only as well."""
    from sfr_export.models.demo import materialize_demo

    spec, tt, cs, model, names, calib, hold = _small_setup(materialize_demo("demo:tiny-mistral"))
    pairs = cs.pairs[:24]
    pair_b = make_batches(tt, [a for a, _, _ in pairs] + [b for _, b, _ in pairs], 8)
    embed = torch_embedder(model, spec)
    passes = []

    def counted(batches):
        passes.append(batches is pair_b)
        return embed(batches)

    ev = sens.Evaluator(embed=counted, holdout_batches=hold, pair_batches=pair_b, gold=np.array([s for _, _, s in pairs]))
    ev.reference()
    _, thr = obs.observe(model, [(b.input_ids, b.attention_mask) for b in calib], names, obs.ObserveConfig())
    passes.clear()
    sel = sens.choose_modes(model, names, thr, ev, TARGETS)  # random weights: W8A8 holds everywhere
    assert sel.met and sum(m == "w8a8" for m in sel.modes.values()) > 0
    assert sum(passes) == 1, [h["config"] for h in sel.history]
    assert sel.fidelity.spearman_delta is not None  # the kept form was scored on the pairs
    assert sel.history[0]["config"] == "weight-only (cosine only)" and sel.history[0]["spearman_delta"] is None
