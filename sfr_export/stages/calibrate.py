"""Stage 3: INT8 calibration on task-mixed data -> explicit Q/DQ ONNX ("int8") and a CPU int8 form ("int8-cpu").

Reads the fp32 ONNX of ``export:fp32`` and the torch backbone. In a subprocess worker (its memory comes back):
sample the recipe (leakage-guarded), rotate the linear inputs online (``--rotation``, sfr_export.quant.rotation) or
SmoothQuant (either fold checked at min cos >= 0.99999), observe linear inputs, per-layer sensitivity and fidelity-targeted mixed precision (W8A8 / weight-only int8 / float), then write
- ``onnx/int8/model.onnx``: standard-ONNX Q/DQ for TensorRT (see ``sfr_export.quant.qdq``);
- ``onnx/int8-cpu/model.onnx``: ONNX Runtime's int8 contrib ops, the fastest candidate that meets the targets:
  per-token dynamic activations (``MatMulIntegerToFloat``), plain, then (``--rotation on``) with rotated inputs, else
  ``MatMulNBits`` 8-bit block 32 with int8 compute,
  else the latter with the most sensitive MatMuls in float (see :func:`cpu_candidates`);
and measure both with ONNX Runtime against the PyTorch fp32 reference on held-out texts and scored STS pairs.
"""

from __future__ import annotations

import logging
import shutil
from collections import Counter
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..choice import Choice
from ..errors import ArtifactError, CalibrationError, UserInputError
from ..quant.options import CalibrationMethod, ReferenceDtype, RotationMode, WeightRounding
from ..artifact import ArtifactRecord, Manifest, StageRecord
from .common import peak_rss_mb, progress, run_worker, worker_main

log = logging.getLogger(__name__)

# ORT >= 1.20 rewrites DequantizeLinear(weight) -> MatMul into MatMulNBits with int8 activations unless told not to.
QDQ_SESSION_CONFIG = {"session.qdq_matmulnbits_accuracy_level": "0"}
CPU_SESSION_CONFIG: dict[str, str] = {}
SMALL_MODEL_BYTES = 256 << 20  # below: calibrate with one torch thread
AUTO_BF16_BYTES = 8 << 30  # reference_dtype "auto": above 8 GiB of fp32 weights calibrate on a bf16 torch model


@dataclass(frozen=True)
class CalibrateConfig:
    recipe: str = "default"
    data: str | None = None  # the user's own JSONL (text, task, optional instruction) instead of a recipe
    method: CalibrationMethod = CalibrationMethod.MINMAX
    percentile: float = 99.999
    # off | auto | an alpha in [0, 1]. Default off: on real SmolLM2 the search leaves most MatMuls weight-only, and
    # "auto" smoothing (112 of 120 groups) took weight-only int8 from held-out cos 0.99877 to 0.99341
    smoothquant: str = "off"
    target_cosine: float | None = None  # given: strict (fail, no artifact, when unreachable); None: default 0.995
    target_p1: float = 0.98
    target_spearman_delta: float = 0.3
    max_float_fraction: float = 0.25
    w8a8_margin: float = 0.5  # W8A8 only while this share of the cosine error budget stays unused on held-out texts
    w8a8: bool = True  # allow W8A8 on MatMuls proven safe
    cpu_form: bool = True
    samples: int | None = None
    holdout: int | None = None
    seed: int | None = None
    batch_size: int = 8
    pairs: int | None = None  # use only the first N held-out scored pairs (None: all of the recipe's)
    reference_dtype: ReferenceDtype = ReferenceDtype.AUTO  # auto: bfloat16 above AUTO_BF16_BYTES of fp32 weights
    # online rotations of the linear inputs (sfr_export.quant.rotation; the torch model is rotated, the fold proven
    # at min cos >= 0.99999): "auto" rotates the Q/DQ (TensorRT) form of last-token models, with the first position
    # and the pooled row float, so that its static per-tensor scales hold: on real SmolLM2 the build then runs 207 of
    # 210 linears W8A8 (98.5% of the MACs), cos 0.9989 on held-out texts (docs/int8.md); without rotation SmolLM2's
    # Q/DQ form is weight-only. The CPU form of those models then tries its folded candidate after plain row8: on a
    # VNNI CPU it ran 2.35-2.57x torch fp32 at B8 x L128 with expected dSpearman -0.04 on all 1,379 STSB test pairs,
    # where the unrotated search chose nbits8 + 5% float: 1.4x, -0.29 (docs/int8.md). "on": every model, and the CPU
    # form's per-linear rotated candidate too; "off": neither
    rotation: RotationMode = RotationMode.AUTO
    # W8A8 (TensorRT form): the first N positions keep float activations (their own MatMul on the same int8 weight)
    # and are left out of the static ranges: a causal decoder's first token carries the massive activations
    # (|x| ~ 3250 at real SmolLM2's down_proj input) that would otherwise set every per-tensor scale. None: 1 when the
    # Q/DQ form is rotated, else 0
    prefix_float: int | None = None
    # W8A8 (TensorRT form), last-token models: each text's pooled row keeps float activations (one float MatMul on
    # B rows per linear, through the same int8 weight). The pooled row's own error reaches the embedding directly;
    # measured on real SmolLM2 (torch, all 1379 STSB test pairs, rotated, first position float, every linear W8A8
    # with static per-tensor scales): cos 0.99908, dSpearman -0.19 (expected -0.16); without it 0.99749, -1.33
    pooled_float: bool = True
    # the int8 weights of the Q/DQ form and of the folded CPU candidate: GPTQ (error-compensated rounding on the
    # calibration texts' inputs to each MatMul, from the torch model / the folded float graph; same scales and ops)
    # or to nearest. On real SmolLM2 most of the folded form's error was the weights' (docs/int8.md, "Weight rounding")
    weight_rounding: WeightRounding = WeightRounding.GPTQ

    def __post_init__(self) -> None:
        for name, kind in (("method", CalibrationMethod), ("reference_dtype", ReferenceDtype), ("rotation", RotationMode),
                           ("weight_rounding", WeightRounding)):
            object.__setattr__(self, name, kind.parse(getattr(self, name)))
        if self.target_cosine is not None and not 0.0 < self.target_cosine <= 1.0:
            raise UserInputError(f"--target-cosine must be in (0, 1], got {self.target_cosine}")
        if not 0.0 < self.target_p1 <= 1.0 or self.target_spearman_delta < 0:
            raise UserInputError("target p1 must be in (0, 1] and the Spearman delta target >= 0")
        if not 0.0 <= self.w8a8_margin < 1.0:
            raise UserInputError(f"w8a8_margin must be in [0, 1), got {self.w8a8_margin}")
        if not 0.0 <= self.max_float_fraction <= 1.0:
            raise UserInputError(f"max_float_fraction must be in [0, 1], got {self.max_float_fraction}")
        if self.prefix_float is not None and self.prefix_float < 0:
            raise UserInputError(f"--prefix-float must be >= 0, got {self.prefix_float}")
        if self.batch_size < 1:
            raise UserInputError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.rotation is RotationMode.ON and self.alpha() is not None:
            raise UserInputError("--rotation on and --smoothquant are alternatives (both move outliers); pick one")
        self.alpha()
        if self.data is None:  # an unknown recipe is named before the output dir's lock is taken
            from ..quant.recipe import resolve_recipe_path

            resolve_recipe_path(self.recipe)

    def rotate(self, last_token: bool) -> bool:
        """Is the torch model (and so the Q/DQ form) rotated? "auto": for last-token models without SmoothQuant."""
        auto = self.rotation is RotationMode.AUTO and last_token and self.alpha() is None
        return self.rotation is RotationMode.ON or auto

    def fold_cpu(self, last_token: bool) -> bool:
        """Does the CPU form try its folded candidate? As ``rotate``: on a VNNI CPU (real SmolLM2, all 1,379 STSB
        test pairs) it ran 2.35-2.57x torch fp32 at expected dSpearman -0.04, where the unrotated search's choice ran
        1.4x at -0.29 (docs/int8.md)."""
        return self.rotate(last_token)

    def rotate_cpu(self) -> bool:
        """Does the CPU form try its per-linear rotated candidate? Only with "on" (see ``cpu_candidates``)."""
        return self.rotation is RotationMode.ON

    def prefix(self, last_token: bool) -> int:
        """Leading positions the W8A8 MatMuls keep float."""
        if self.prefix_float is not None:
            return self.prefix_float
        return 1 if self.rotate(last_token) else 0

    def torch_dtype_for(self, fp32_bytes: int) -> str:
        """auto: fp32 up to AUTO_BF16_BYTES of fp32 weights, bf16 above (a 7B in fp32 alone is ~29 GB)."""
        if self.reference_dtype is not ReferenceDtype.AUTO:
            return self.reference_dtype.value
        return "bfloat16" if fp32_bytes > AUTO_BF16_BYTES else "float32"

    def alpha(self) -> float | str | None:
        if self.smoothquant in ("off", "none"):
            return None
        if self.smoothquant == "auto":
            return "auto"
        try:
            a = float(self.smoothquant)
        except ValueError:
            raise UserInputError(f"--smoothquant must be off, auto or an alpha in [0, 1], got {self.smoothquant!r}") from None
        if not 0.0 <= a <= 1.0:
            raise UserInputError(f"SmoothQuant alpha must be in [0, 1], got {a}")
        return a

    def targets(self) -> Any:
        from ..quant.sensitivity import Targets

        return Targets(cos_mean=self.target_cosine if self.target_cosine is not None else 0.995, cos_p1=self.target_p1,
                       spearman_delta=self.target_spearman_delta, max_float_fraction=self.max_float_fraction,
                       w8a8_margin=self.w8a8_margin)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (a Choice as its text), as the manifest and the job file keep them."""
        return {k: v.value if isinstance(v, Choice) else v for k, v in asdict(self).items()}


# ------------------------------------------------------------------------------------------------------------------
# Worker
# ------------------------------------------------------------------------------------------------------------------
def torch_embedder(model: Any, spec: Any) -> Any:
    import torch

    from ..pooling import pool_and_normalize

    def embed(batches: Any) -> np.ndarray:
        n = sum(len(b.indices) for b in batches)
        out: np.ndarray | None = None
        with torch.inference_mode():
            for b in batches:
                ids, mask = torch.from_numpy(b.input_ids), torch.from_numpy(b.attention_mask)
                v = pool_and_normalize(model(input_ids=ids, attention_mask=mask).last_hidden_state, mask, spec.pooling,
                                       spec.normalize).float().numpy()
                if out is None:
                    out = np.empty((n, v.shape[1]), np.float32)
                out[b.indices] = v
        assert out is not None
        return out
    return embed


def _ort_embed(path: Path, session_config: dict[str, str], batches: Any) -> np.ndarray:
    from ..runtime.ort_runner import OrtRunner

    n = sum(len(b.indices) for b in batches)
    out: np.ndarray | None = None
    with OrtRunner(path, session_config=session_config) as r:
        for b in batches:
            v = r.infer(b.input_ids, b.attention_mask)
            if out is None:
                out = np.empty((n, v.shape[1]), np.float32)
            out[b.indices] = v
    assert out is not None
    return out


def make_batches(tt: Any, texts: list[str], batch_size: int) -> list[Any]:
    from ..tokenization import length_batches

    return list(length_batches(tt.encode(texts).ids, tt, batch_size=batch_size))


@dataclass
class _Inputs:
    """Everything the calibration steps share: texts as batches, the torch model, its MatMul mapping, the evaluator."""

    cfg: CalibrateConfig
    src: Path
    out_dir: Path
    recipe: Any
    calib_b: list[Any]
    hold_b: list[Any]
    pair_b: list[Any] | None
    gold: np.ndarray | None
    model: Any = None
    mapping: dict[str, Any] = field(default_factory=dict)
    ev: Any = None
    figures: dict[str, Any] = field(default_factory=dict)
    rotations: dict[str, Any] = field(default_factory=dict)  # linear -> Rotation (the torch model is rotated)
    attention: Any = None  # the export's AttentionPlan (which fused attention op the CPU form takes)
    last_token: bool = False  # the model pools its last attended token
    # the residual fold's float channels, found while the torch model is loaded (None: no folded candidate)
    fold_channels: tuple[int, ...] | None = None
    moments: Any = None  # the folded graph's MatMul input moments (quant.gptq.MomentStore) for GPTQ rounding


def _load_inputs(job: dict[str, Any]) -> _Inputs:
    """Sample the recipe (leakage-guarded) and tokenize calibration, held-out and scored-pair texts."""
    from ..models import load_tokenizer
    from ..quant.recipe import load_recipe, recipe_from_jsonl, sample_recipe
    from ..spec import ModelSpec, PoolingMode
    from ..tokenization import TextTokenizer

    cfg = CalibrateConfig(**job["config"])
    spec = ModelSpec.from_dict(job["spec"])
    tt = TextTokenizer(load_tokenizer(Path(job["model_dir"])), spec)
    if cfg.data:
        recipe = recipe_from_jsonl(Path(cfg.data), samples=cfg.samples or 128, holdout=cfg.holdout or 32, seed=cfg.seed or 0)
    else:
        recipe = load_recipe(cfg.recipe, samples=cfg.samples, holdout=cfg.holdout, seed=cfg.seed)
    cs = sample_recipe(recipe, tt, spec, method=cfg.method)
    progress(f"recipe '{recipe.name}': {len(cs.calibration)} calibration + {len(cs.holdout)} held-out texts, {len(cs.pairs)} pairs")
    if cfg.pairs is not None:
        cs.pairs = cs.pairs[: cfg.pairs]
    pair_b, gold = None, None
    if cs.pairs:
        sts = spec.apply_prompt([a for a, _, _ in cs.pairs] + [b for _, b, _ in cs.pairs], "STSBenchmark")
        pair_b, gold = make_batches(tt, sts, 32), np.array([s for _, _, s in cs.pairs])
    inp = _Inputs(cfg=cfg, src=Path(job["fp32_onnx"]), out_dir=Path(job["out_dir"]), recipe=recipe,
                  calib_b=make_batches(tt, [c.text for c in cs.calibration], cfg.batch_size),
                  hold_b=make_batches(tt, [c.text for c in cs.holdout], cfg.batch_size), pair_b=pair_b, gold=gold,
                  last_token=spec.pooling is PoolingMode.LASTTOKEN)
    inp.figures.update({"recipe": recipe.to_dict(), "sample": cs.summary()})
    return inp


def _load_model(inp: _Inputs, job: dict[str, Any]) -> None:
    """The torch reference, the MatMul <-> linear mapping, and the reference embeddings."""
    import onnx
    import torch

    from ..models import load_backbone
    from ..quant import observe as obs, qdq, sensitivity as sens
    from ..spec import ModelSpec
    from .export import plan_attention_from_dir

    fp32_bytes = _onnx_weight_bytes(inp.src)
    if fp32_bytes < SMALL_MODEL_BYTES:
        # tiny GEMMs gain nothing from a second thread, and on a busy machine OpenMP's thread hand-off made the
        # 2-thread run of demo:tiny-mistral's calibration 9x slower than one thread (355 s vs 40 s)
        torch.set_num_threads(1)
    ref_dtype = inp.cfg.torch_dtype_for(fp32_bytes)
    progress(f"loading the torch reference ({ref_dtype})")
    inp.model = load_backbone(Path(job["model_dir"]), dtype=ref_dtype)
    inp.attention = plan_attention_from_dir(Path(job["model_dir"]))
    linears = obs.linear_modules(inp.model)
    proto = onnx.load(str(inp.src), load_external_data=False)
    inp.mapping = qdq.map_matmuls(proto, {n: tuple(m.weight.shape) for n, m in linears.items()})
    del proto
    for n in inp.mapping:  # the graph must hold this model's weights, or the mapping is wrong
        if not torch.isfinite(linears[n].weight.detach()).all():
            raise CalibrationError(f"weight of {n} is not finite")
    inp.ev = sens.Evaluator(embed=torch_embedder(inp.model, ModelSpec.from_dict(job["spec"])), holdout_batches=inp.hold_b,
                            pair_batches=inp.pair_b, gold=inp.gold, prefix=inp.cfg.prefix(inp.last_token),
                            pooled=_pooled_float(inp))
    inp.ev.reference()
    inp.figures.update({"matmuls_mapped": len(inp.mapping), "linears_in_model": len(linears), "reference_dtype": ref_dtype,
                        "fp32_weight_bytes": fp32_bytes})


def _pooled_float(inp: _Inputs) -> bool:
    return inp.cfg.pooled_float and inp.last_token


def _check_fold(inp: _Inputs, what: str) -> dict[str, float]:
    """A float-equivalent transform (SmoothQuant, rotation) must leave the model's embeddings unchanged."""
    from ..quant import sensitivity as sens

    fold = sens.fidelity(inp.ev.ref, inp.ev.embed(inp.hold_b))
    if fold.cos_min < 0.99999:
        raise CalibrationError(f"{what} changed the fp32 model: min cos {fold.cos_min:.7f} < 0.99999")
    return {"min_cosine": fold.cos_min, "mean_cosine": fold.cos_mean}


def _rotate(inp: _Inputs) -> None:
    """Online rotations of every linear input (QuaRot-style, the norm scale left on the activation), folded into the
    torch model in place so that observation, sensitivity and the search all see the rotated model."""
    from ..quant.rotation import rotate_model

    names = list(inp.mapping)
    inp.rotations = rotate_model(inp.model, names, seed=inp.recipe.seed)
    inp.figures["rotation"] = {"linears": len(inp.rotations), "fold_check": _check_fold(inp, "the rotation fold"),
                               "factors": sorted({(r.dim, r.na, r.nb) for r in inp.rotations.values()})}
    progress(f"rotated {len(inp.rotations)} linear inputs (fold min cos {inp.figures['rotation']['fold_check']['min_cosine']:.7f})")


def _observe(inp: _Inputs) -> tuple[dict[str, Any], dict[str, float], dict[str, np.ndarray]]:
    """Activation statistics (SmoothQuant first when asked); returns (stats, thresholds, norm_updates)."""
    import torch

    from ..quant import observe as obs, smoothquant as sq

    names, cfg, model = list(inp.mapping), inp.cfg, inp.model
    batches = [(b.input_ids, b.attention_mask) for b in inp.calib_b]
    progress(f"observing {len(names)} linear inputs on {len(inp.calib_b)} batches")
    skip = cfg.prefix(inp.last_token)
    stats, thresholds = obs.observe(model, batches, names, obs.ObserveConfig(method="minmax", skip_prefix=skip),
                                    seed=inp.recipe.seed)
    inp.figures["activation_absmax_top"] = dict(sorted(((n, round(v, 2)) for n, v in thresholds.items()), key=lambda kv: -kv[1])[:8])
    alpha = cfg.alpha()
    norm_updates: dict[str, np.ndarray] = {}
    if alpha is not None:
        orig_norms = {n: p.detach().clone() for n, p in model.named_parameters() if "norm" in n}
        rep = sq.smooth_model(model, stats, alpha)
        progress(f"SmoothQuant ({alpha}): folded {rep['applied']} of {rep['groups']} groups")
        rep["fold_check"] = _check_fold(inp, "SmoothQuant fold")
        mods = dict(model.named_modules())
        for g in sq.fold_groups(model):
            if g.kind == "norm" and rep["per_group"].get(g.producer, {}).get("alpha") is not None:
                pname = f"{g.producer}.weight"
                if not torch.equal(orig_norms[pname], mods[g.producer].weight):
                    norm_updates[inp.mapping[g.consumers[0]].activation] = mods[g.producer].weight.detach().numpy().copy()
        inp.figures["smoothquant"] = {k: v for k, v in rep.items() if k != "per_group"}
        inp.figures["smoothquant"]["alphas"] = {k: v["alpha"] for k, v in rep["per_group"].items()}
    if alpha is not None or cfg.method is not CalibrationMethod.MINMAX:
        progress(f"activation ranges by {cfg.method}")
        _, thresholds = obs.observe(model, batches, names, obs.ObserveConfig(method=cfg.method, percentile=cfg.percentile, skip_prefix=skip),
                                    seed=inp.recipe.seed)
    return stats, thresholds, norm_updates


def _write_qdq(inp: _Inputs, sel: Any, thresholds: dict[str, float], norm_updates: dict[str, np.ndarray]) -> dict[str, Any]:
    """The TensorRT form (weights from the torch model: rotated in place when rotations are on)."""
    from ..quant import qdq

    from ..quant.gptq import torch_moments

    mods = dict(inp.model.named_modules())
    qdir = inp.out_dir / "int8"
    qdir.mkdir(parents=True)
    moments = None
    if inp.cfg.weight_rounding is WeightRounding.GPTQ:
        moments = torch_moments(inp.model, [n for n, m in sel.modes.items() if m != "float"], inp.calib_b,
                                inp.out_dir / "moments-qdq")
        progress(f"GPTQ: input moments of {len(moments)} linears on {moments.tokens} calibration tokens")
    progress("writing the Q/DQ model")
    return qdq.build_quantized(inp.src, qdir / "model.onnx", inp.mapping,
                               qdq.QuantPlan(sel.modes, thresholds, rotations=inp.rotations,
                                             prefix_float=inp.cfg.prefix(inp.last_token),
                                             pooled_float=_pooled_float(inp), moments=moments),
                               weight_of=lambda n: mods[n].weight.detach().float().numpy(),
                               bias_of=lambda n: None if mods[n].bias is None else mods[n].bias.detach().float().numpy(),
                               edits=qdq.GraphEdits(norms=norm_updates))


def _calibrate_job(job: dict[str, Any]) -> dict[str, Any]:
    import gc

    from ..quant import sensitivity as sens

    t0 = time.time()
    inp = _load_inputs(job)
    _load_model(inp, job)
    cfg, figures = inp.cfg, inp.figures
    if cfg.rotate(inp.last_token):
        _rotate(inp)
    stats, thresholds, norm_updates = _observe(inp)
    names = list(inp.mapping)
    targets = cfg.targets()
    sel = sens.choose_modes(inp.model, names, thresholds, inp.ev, targets, allow_w8a8=cfg.w8a8,
                            strict=cfg.target_cosine is not None, progress=progress,
                            rows={n: s.sample() for n, s in stats.items()})
    figures["mixed_precision"] = {"modes": dict(sorted(Counter(sel.modes.values()).items())),
                                  "torch_fidelity": sel.fidelity.to_dict(), "history": sel.history, "sensitivity": sel.sensitivity_kind,
                                  "float": {n: r for n, r in sel.float_reasons.items() if sel.modes[n] == "float"},
                                  "w8a8": sorted(n for n, m in sel.modes.items() if m == "w8a8"),
                                  "w8a8_mac_share": mac_share(inp.model, sel.modes, "w8a8"),
                                  "pooled_rows_float": _pooled_float(inp)}
    info = _write_qdq(inp, sel, thresholds, norm_updates)
    result: dict[str, Any] = {"figures": figures, "int8": {"build": info, "modes": sel.modes}}
    if cfg.cpu_form and cfg.fold_cpu(inp.last_token):
        inp.fold_channels = _fold_channels(inp)
    inp.ev.embed = None  # its closure holds the torch model
    inp.model = None
    del stats
    gc.collect()
    figures["peak_rss_mb_with_torch_model"] = peak_rss_mb()
    progress("measuring the Q/DQ model with ONNX Runtime")
    result["int8"]["fidelity"] = _measure(inp.out_dir / "int8" / "model.onnx", QDQ_SESSION_CONFIG, inp.ev, inp.hold_b,
                                          inp.pair_b, inp.gold, targets)
    if cfg.cpu_form:
        progress("writing the CPU int8 form (the fastest int8 candidate that meets the targets)")
        result["int8-cpu"] = _cpu_form(inp, sel, targets)
    result["calibrate_seconds"] = time.time() - t0
    return result


def mac_share(model: Any, modes: dict[str, str], mode: str) -> float:
    """Share of the linear layers' multiply-adds (per token: in x out of each linear) that run in ``mode``."""
    from ..quant.observe import linear_modules

    macs = {n: int(m.weight.shape[0]) * int(m.weight.shape[1]) for n, m in linear_modules(model).items() if n in modes}
    total = sum(macs.values())
    return round(sum(v for n, v in macs.items() if modes[n] == mode) / total, 4) if total else 0.0


def _onnx_weight_bytes(path: Path) -> int:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return sum(int(np.prod(t.dims)) * 4 for t in m.graph.initializer)


def _measure(path: Path, session_config: dict[str, str], ev: Any, hold_b: Any, pair_b: Any, gold: Any, targets: Any) -> dict[str, Any]:
    from ..quant.sensitivity import fidelity

    cand = _ort_embed(path, session_config, hold_b)
    f = fidelity(ev.ref, cand)
    if not targets.met(f):  # below the cosine targets on the held-out texts: the scored pairs cannot rescue it
        return {**f.to_dict(), "met": False, "measured_on": "held-out calibration texts, ORT vs the torch reference "
                "(reference_dtype); the scored pairs were skipped: the cosine targets already fail"}
    pc = _ort_embed(path, session_config, pair_b) if pair_b else None
    f = fidelity(ev.ref, cand, ev.pairs_ref, pc, gold)
    return {**f.to_dict(), "met": targets.met(f), "measured_on": "held-out calibration texts + scored STSB-dev pairs, ORT vs the torch reference (reference_dtype)"}


# The residual fold's float channels (sfr_export.quant.fold): on real SmolLM2 (400 STSB test pairs, torch fake
# quantization, every linear per-token int8) the plain fold gave cos 0.99726, two float channels 0.99889, four
# 0.99888, sixteen 0.99898, against 0.99876 for the online rotations it replaces (docs/int8.md)
FOLD_FLOAT_CHANNELS = 2


def fold_down_block(exact_rows: bool) -> int:
    """Channels per block of the fold's online block-Hadamard at ``down_proj`` (its MatMul costs in proportion).
    Where each text's first and pooled rows get a second int8 digit (last-token models), 16 is as good as 64: real
    SmolLM2, torch fake quantization, all 1,379 STSB test pairs, cos 0.99936 / 0.99933 / 0.99939 at 16 / 32 / 64
    (expected dSpearman -0.052 / -0.047 / -0.046; none: 0.99914, -0.109), and a fresh build runs 1.075x faster at
    B8 x L128 (one thread). Without those digits 16 gave 13% more 1 - cos than 64 (400 pairs), so 64 (docs/int8.md)."""
    return 16 if exact_rows else 64


# Linears whose input the CPU form does not rotate: the attention output holds no outlier that per-token scales
# cannot hold. On real SmolLM2 (300 STSB test pairs) rotating o_proj too moved row8 from cos 0.99876 to 0.99889 for
# one more online rotation per layer (of four).
CPU_ROTATION_SKIP = ("o_proj", "attention.output.dense")


@dataclass(frozen=True)
class CpuCandidate:
    label: str
    modes: dict[str, str]
    rotated: frozenset[str] = frozenset()  # linears whose input is rotated online
    pooled_exact: bool = False  # row8: the pooled row of every activation gets a second int8 digit (QuantPlan)
    first_exact: bool = False  # row8 with pooled_exact: each text's first attended row gets it too (QuantPlan)
    fold: bool = False  # the residual stream rotated once (sfr_export.quant.fold); ``rotated``: down_proj only
    down_block: int = 64  # fold: channels per block of down_proj's online block-Hadamard (fold_down_block)


def cpu_candidates(names: list[str], sensitivity: dict[str, float], w8a8: set[str], *,
                   last_token: bool = False, fold: bool = True, rotate: bool = True) -> list[CpuCandidate]:
    """The CPU form's candidates, fastest first. Measured on real SmolLM2, B8 x L128, one thread, against torch fp32
    eager: ``row8`` ~2.5-2.9x, ``row8`` rotated ~2.2-2.5x (docs/int8.md), ``nbits8`` ~0.9x. ``row8`` (per-token
    activation scales) fails where activation outliers sit inside a token (real SmolLM2: channel outliers and the
    first token's massive down_proj input); the online rotation spreads them over all channels; blockwise ``nbits8``
    contains them at a much lower speed. With last-token pooling the pooled row's own error reaches the embedding
    directly: a second digit for it (``pooled_exact``) took the torch probe of rotated per-token int8 on real SmolLM2
    from expected ΔSpearman -0.29 to -0.04 (1379 STSB test pairs, docs/int8.md), for ~5% of the speed, so for
    last-token models the rotated candidate is the pooled-exact one."""
    order = sorted(names, key=lambda n: -sensitivity.get(n, 0.0))  # most W8A8-sensitive first
    rot = frozenset(n for n in names if not n.endswith(CPU_ROTATION_SKIP))
    rotated = (CpuCandidate("row8 rotated, pooled rows exact", {n: "row8" for n in names}, rot, pooled_exact=True)
               if last_token else CpuCandidate("row8 rotated", {n: "row8" for n in names}, rot))
    # fold (--rotation auto for last-token models, or on): the residual fold, which removes two of the three online
    # rotations per layer. rotate (--rotation on): the per-linear rotations; not in auto, because with the recipe's
    # seed that form realized dSpearman -0.32 and -0.41 on all 1,379 STSB test pairs in two SmolLM2 builds (expected
    # -0.05), where the folded forms realized -0.11 to +0.10 (docs/int8.md)
    # its first rows too (the attention sink): on real SmolLM2 that halved 1 - cos on all STSB test pairs and STS13
    # (docs/int8.md, "The first row")
    folded = CpuCandidate(f"row8 folded, {FOLD_FLOAT_CHANNELS} residual channels float"
                          + (", pooled and first rows exact" if last_token else ""),
                          {n: "row8" for n in names}, frozenset(n for n in names if n.endswith("down_proj")),
                          pooled_exact=last_token, first_exact=last_token, fold=True,
                          down_block=fold_down_block(last_token))
    out = [CpuCandidate("row8", {n: "row8" for n in names})] + ([folded] if fold else []) + ([rotated] if rotate else [])
    few = set(order[: max(1, int(round(0.15 * len(order))))])
    out.append(CpuCandidate("row8 + nbits8 on the 15% most sensitive", {n: ("nbits8" if n in few else "row8") for n in names}))
    if w8a8 and len(w8a8) < len(names) and w8a8 != set(names) - few:
        out.append(CpuCandidate("row8 where W8A8 is proven safe, nbits8 elsewhere",
                                {n: ("row8" if n in w8a8 else "nbits8") for n in names}))
    out.append(CpuCandidate("nbits8", {n: "nbits8" for n in names}))
    for frac in (0.05, 0.15, 0.3):
        floats = set(order[: int(round(frac * len(order)))])
        out.append(CpuCandidate(f"nbits8 + float on the {frac:.0%} most sensitive",
                                {n: ("float" if n in floats else "nbits8") for n in names}))
    return out


def fuse_cpu_attention(path: Path, plan: Any, *, pooled_tail: bool = True) -> str:
    """Rewrite the CPU form's ``Attention`` nodes in place to the contrib op ONNX Runtime's CPU provider runs fastest,
    as the fp32 export's ``model.cpu.onnx`` (attention stays float; ``pooled_tail`` as there); returns the op used."""
    from .ort_attention import cpu_form_op, write_cpu_form

    op = cpu_form_op(plan.form, plan.num_heads, plan.kv_heads)
    if op is not None:
        write_cpu_form(path, plan, dst=path, pooled_tail=pooled_tail)
    return op or "Attention"


def write_cpu_candidate(src: Path, path: Path, mapping: dict[str, Any], cand: CpuCandidate, *, seed: int,
                        attention: Any, fold: Any = None, moments: Any = None,
                        pooled_tail: bool = True) -> tuple[str, dict[str, Any]]:
    """Write one CPU candidate to ``path`` from the fp32 ONNX ``src``, streaming its weights one tensor at a time
    (rotated there in float64 when the candidate is rotated; folded by ``fold``, a ResidualFold, when given; its
    int8 weights rounded by GPTQ on ``moments``, a quant.gptq.MomentStore, when given; ``pooled_tail=False`` keeps
    every row of the last layer, as a graph read for its MatMul inputs must); returns the attention op the form runs
    and the writer's figures."""
    import onnx

    from ..quant import qdq
    from ..quant.rotation import make_rotation

    proto = onnx.load(str(src), load_external_data=False)
    inits = {t.name: t for t in proto.graph.initializer}
    del proto
    rots = {n: make_rotation(int(inits[mapping[n].weight].dims[0]), seed) for n in cand.rotated}
    if cand.fold:  # the fold leaves down_proj rotated online: the block-Hadamard factor alone does as well there
        # (real SmolLM2, torch probe, 400 STSB test pairs: cos 0.99890 against 0.99888), for one MatMul instead of two
        rots = {n: r.block_only(min(cand.down_block, r.nb)) for n, r in rots.items()}

    def weight_of(n: str) -> np.ndarray:
        w = qdq.read_tensor(inits[mapping[n].weight], src.parent).T  # ONNX B is [in, out]
        w = fold.weight(n, w) if fold is not None else w
        return rots[n].apply(w) if n in rots else w

    plan = qdq.QuantPlan(cand.modes, {}, rotations=rots, pooled_exact=cand.pooled_exact, first_exact=cand.first_exact,
                         float_channels=fold.float_channels() if fold is not None else {}, moments=moments)
    edits = None if fold is None else fold.graph_edits(lambda: qdq.read_tensor(inits[fold.embedding], src.parent))
    info = qdq.build_quantized(src, path, mapping, plan, weight_of=weight_of, bias_of=lambda n: None, edits=edits)
    return fuse_cpu_attention(path, attention, pooled_tail=pooled_tail), info


def _fold_channels(inp: _Inputs) -> tuple[int, ...] | None:
    """The residual fold's float channels (the torch model's most massive residual channels on the calibration
    texts); None, with the reason in the figures, for a model the fold does not apply to."""
    from ..quant import fold as fd

    try:
        fd.fold_linears(inp.mapping)
    except CalibrationError as exc:
        inp.figures["residual_fold"] = {"skipped": str(exc)}
        return None
    return fd.massive_channels(inp.model, inp.calib_b, FOLD_FLOAT_CHANNELS)


def _plan_fold(inp: _Inputs, out: Path) -> Any:
    """The residual fold of this graph, proven exact in float (min cos >= 0.99999 on the held-out texts, ORT vs the
    torch reference); None, with the reason in the figures, for a graph it does not apply to."""
    from ..quant import fold as fd
    from ..quant.sensitivity import fidelity

    if inp.fold_channels is None:
        return None
    fold = fd.plan_for_graph(inp.src, inp.mapping, inp.fold_channels, inp.recipe.seed)
    keep = fold.keep
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    modes = {n: "float" for n in inp.mapping}
    write_cpu_candidate(inp.src, out / "model.onnx", inp.mapping, CpuCandidate("float, folded", modes, fold=True,
                        rotated=frozenset(n for n in modes if n.endswith("down_proj")),
                        down_block=fold_down_block(inp.last_token)), seed=inp.recipe.seed,
                        attention=inp.attention, fold=fold, pooled_tail=False)  # GPTQ's moments: every row
    f = fidelity(inp.ev.ref, _ort_embed(out / "model.onnx", CPU_SESSION_CONFIG, inp.hold_b))
    if f.cos_min < 0.99999:
        raise CalibrationError(f"the residual fold changed the fp32 model: min cos {f.cos_min:.7f} < 0.99999")
    inp.figures["residual_fold"] = {"float_channels": list(keep), "float_min_cosine": f.cos_min}
    progress(f"residual fold exact in float (min cos {f.cos_min:.7f}); float channels {list(keep)}")
    if inp.cfg.weight_rounding is WeightRounding.GPTQ:
        inp.moments = _fold_moments(inp, out / "model.onnx")
    return fold


def _fold_moments(inp: _Inputs, float_graph: Path) -> Any:
    """The second moments of every linear's MatMul input in the folded float graph (the basis its int8 weight is
    written in), on the calibration texts, for GPTQ rounding."""
    from ..quant.gptq import input_moments

    store = input_moments(float_graph, matmul_inputs(float_graph, inp.src, inp.mapping), inp.calib_b,
                          CPU_SESSION_CONFIG, inp.out_dir / "moments")
    progress(f"GPTQ: input moments of {len(store)} linears on {store.tokens} calibration tokens")
    return store


def matmul_inputs(graph: Path, src: Path, mapping: dict[str, Any]) -> dict[str, tuple[str, int]]:
    """Each linear's MatMul input tensor in ``graph`` (a candidate written from ``src``: a rotated input is renamed)
    and its width K."""
    import onnx

    nodes = {n.name: n for n in onnx.load(str(graph), load_external_data=False).graph.node}
    weights = {m.weight for m in mapping.values()}
    k_of = {t.name: int(t.dims[0]) for t in onnx.load(str(src), load_external_data=False).graph.initializer
            if t.name in weights}
    return {n: (nodes[m.node].input[0], k_of[m.weight]) for n, m in mapping.items()}


def _rounding_figures(built: dict[str, Any]) -> dict[str, Any]:
    gptq = built.get("gptq")
    return {"method": "nearest"} if gptq is None else {"method": "gptq", **gptq}


def _cpu_form(inp: _Inputs, sel: Any, targets: Any) -> dict[str, Any]:
    """The fastest of :func:`cpu_candidates` that meets the fidelity targets on held-out texts (fidelity first: the
    candidates are tried fastest first, and the first that meets the targets is kept)."""
    out = inp.out_dir / "int8-cpu"
    w8a8 = {n for n, m in sel.modes.items() if m == "w8a8"}
    tries = []
    cand = None
    fold: Any = None
    for cand in cpu_candidates(list(inp.mapping), sel.sensitivity_w8a8, w8a8, last_token=inp.last_token,
                               fold=inp.cfg.fold_cpu(inp.last_token), rotate=inp.cfg.rotate_cpu()):
        if cand.fold:
            fold = _plan_fold(inp, out)
            if fold is None:
                continue
        progress(f"CPU int8 form: trying {cand.label}")
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        attention, built = write_cpu_candidate(inp.src, out / "model.onnx", inp.mapping, cand, seed=inp.recipe.seed,
                                               attention=inp.attention, fold=fold if cand.fold else None,
                                               moments=inp.moments if cand.fold else None)
        fid = _measure(out / "model.onnx", CPU_SESSION_CONFIG, inp.ev, inp.hold_b, inp.pair_b, inp.gold, targets)
        tries.append({"candidate": cand.label, "modes": dict(sorted(Counter(cand.modes.values()).items())),
                      "rotated": len(cand.rotated), "pooled_exact": cand.pooled_exact,
                      "first_exact": cand.first_exact, "fold": cand.fold,
                      **({"down_block": cand.down_block} if cand.fold else {}),
                      "weight_rounding": _rounding_figures(built), **fid})
        if fid["met"]:
            break
    assert cand is not None
    return {"fidelity": tries[-1], "tries": tries, "chosen": tries[-1]["candidate"], "attention": attention,
            "float_nodes": sorted(n for n, m in cand.modes.items() if m == "float"),
            "per_matmul": cand.modes, "rotated_inputs": sorted(cand.rotated), "pooled_exact": cand.pooled_exact,
            "first_exact": cand.first_exact,
            "residual_fold": inp.figures.get("residual_fold") if cand.fold else None,
            "form": {"row8": {"op": "com.microsoft.MatMulIntegerToFloat", "activation": "per-token symmetric, dynamic",
                              "weight": "per-output-channel symmetric int8 (folded form: GPTQ-rounded unless "
                                        "--weight-rounding nearest; see tries[].weight_rounding)",
                              "pooled_exact": "the pooled row's rounding residual as a second int8 digit (ScatterND add)",
                              "first_exact": "each text's first attended row gets that second digit too"},
                     "nbits8": {"op": "com.microsoft.MatMulNBits", "bits": 8, "block_size": 32, "symmetric": True,
                                "accuracy_level": 4},
                     "rotation": {"ops": "Reshape, MatMul (random-sign Hadamard), Transpose, MatMul (random orthogonal), "
                                         "Reshape", "weights": "W R, folded one tensor at a time"},
                     "residual_fold": {"ops": "the embedding table E Q, writers Q^T W, readers W diag(g) Q, MatMul x Q^T "
                                              "before the final norm's scale; the float channels: Mul (mask), Gather, "
                                              "MatMul, Add; down_proj's input: Reshape, MatMul (random-sign "
                                              "block-Hadamard), Reshape"}}}


# ------------------------------------------------------------------------------------------------------------------
# Stage entry
# ------------------------------------------------------------------------------------------------------------------
def _same_config(have: dict[str, Any], want: dict[str, Any]) -> bool:
    return {k: v for k, v in have.items() if k != "ort_session_config"} == want


def run_calibrate(root: Path, config: CalibrateConfig, *, force: bool = False, on_progress: Any = None) -> list[StageRecord]:
    """Calibrate the fp32 ONNX of ``root`` into ``onnx/int8`` (+ ``onnx/int8-cpu``); record both in the manifest."""
    root = Path(root)
    manifest = Manifest.load(root)
    src = _fp32_source(manifest, config)
    names = ["calibrate:int8"] + (["calibrate:int8-cpu"] if config.cpu_form else [])
    want = {n: {**config.to_dict(), "variant": n.split(":")[1]} for n in names}
    done = None if force else _up_to_date(manifest, names, want)
    if done is not None:
        return done
    tmp = root / "onnx" / ".calibrate.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        job = {"config": config.to_dict(), "spec": manifest.data["spec"], "model_dir": manifest.model["local_dir"],
               "fp32_onnx": str(src), "out_dir": str(tmp)}
        result = run_worker("sfr_export.stages.calibrate", job, log_path=root / "logs" / "calibrate.log", on_progress=on_progress)
        return [_record_variant(manifest, n, want[n], tmp, result) for n in names]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fp32_source(manifest: Manifest, config: CalibrateConfig) -> Path:
    """The verified fp32 ONNX to calibrate; refuses SmoothQuant where its fold cannot be proven."""
    if manifest.stage("export:fp32") is None:
        raise ArtifactError(f"{manifest.root} has no export:fp32 stage: run `sfr-export export` first")
    manifest.verify_stage("export:fp32")
    src = manifest.artifact_path("export:fp32", "onnx")
    if config.alpha() is not None and config.torch_dtype_for(_onnx_weight_bytes(src)) == "bfloat16":
        # folding s into bf16 weights rounds them again: on demo:smollm2 that alone moved the smoothed model to
        # min cos 0.99978 against the unsmoothed one, so the required fold check (>= 0.99999) cannot be proven
        raise UserInputError("SmoothQuant needs an fp32 torch reference to prove its fold (bf16 re-rounds the folded "
                             "weights); pass --reference-dtype float32 (about 4 bytes per parameter of RAM) or "
                             "--smoothquant off")
    return src


def _up_to_date(manifest: Manifest, names: list[str], want: dict[str, dict[str, Any]]) -> list[StageRecord] | None:
    existing = [manifest.stage(n) for n in names]
    if not all(e is not None and _same_config(e.config, want[e.name]) for e in existing):
        return None
    try:
        for n in names:
            manifest.verify_stage(n)
    except ArtifactError as exc:
        log.warning("re-calibrating: %s", exc)
        return None
    log.info("calibrate is up to date (use --force to redo)")
    return [e for e in existing if e is not None]


def _record_variant(manifest: Manifest, name: str, config: dict[str, Any], tmp: Path,
                    result: dict[str, Any]) -> StageRecord:
    """Move one variant's files into ``onnx/<variant>`` and record its stage (failed-targets when it misses)."""
    root = manifest.root
    variant = name.split(":")[1]
    final = root / "onnx" / variant
    if final.exists():
        shutil.rmtree(final)
    (tmp / variant).rename(final)  # the .onnx and its .data move together
    arts = [ArtifactRecord.of(root, p, "onnx" if p.suffix == ".onnx" else "onnx-data")
            for p in sorted(final.iterdir()) if p.is_file()]
    part = result[variant]
    fid = part["fidelity"]
    figures = {"fidelity": fid, **({k: v for k, v in part.items() if k not in ("fidelity", "modes")})}
    if variant == "int8":
        figures.update(result["figures"])
        figures["calibrate_seconds"] = result.get("calibrate_seconds")
        figures["worker_peak_rss_mb"] = result.get("worker_peak_rss_mb")
    session = QDQ_SESSION_CONFIG if variant == "int8" else CPU_SESSION_CONFIG
    status, reason = "ok", ""
    if not fid["met"]:
        status = "failed-targets"
        reason = (f"ORT {variant} vs torch fp32: cos mean {fid['cos_mean']:.5f}, p1 {fid['cos_p1']:.5f}, "
                  f"dSpearman {fid.get('spearman_delta')} (noise floor {fid.get('spearman_noise')}; expected "
                  f"{fid.get('spearman_expected')} +- {fid.get('spearman_expected_noise')}) misses the targets")
    rec = StageRecord(stage="calibrate", name=name, config={**config, "ort_session_config": dict(session)},
                      artifacts=arts, figures=figures, status=status, reason=reason, variant=variant)
    manifest.record(rec)
    return rec


if __name__ == "__main__":
    worker_main(_calibrate_job)
