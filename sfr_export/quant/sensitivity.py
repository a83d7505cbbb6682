"""Per-layer quantization sensitivity and fidelity-targeted mixed precision, measured with exact fake quantization
in torch (the same rounding and scales as the ONNX Q/DQ graph: round-half-even, symmetric int8, zero point 0).

Each linear runs as ``w8a8`` (int8 weights per output channel + one static per-tensor activation scale), ``w8``
(weight-only int8) or ``float``. ``choose_modes`` keeps the least sensitive linears at W8A8, the rest weight-only,
and moves the most weight-sensitive to float only if weight-only everywhere still misses the target.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ..errors import FidelityGateError
from ..vectors import row_cosine
from .observe import QMAX, act_scale, linear_modules

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Targets:
    cos_mean: float = 0.995
    cos_p1: float = 0.98
    spearman_delta: float = 0.3  # |Δ Spearman| in points (x100)
    max_float_fraction: float = 0.25
    # W8A8 is added only while the held-out fidelity keeps this share of the cosine error budget in reserve: the search
    # runs on a few dozen texts, and a choice made right at the edge misses the target on other texts (measured on
    # MiniLM: 29 W8A8 MatMuls at held-out cos 0.9955 gave 0.99495 on STSBenchmark test).
    w8a8_margin: float = 0.5

    def with_margin(self) -> "Targets":
        """The stricter targets the W8A8 search accepts (cosine error budgets scaled by ``1 - w8a8_margin``)."""
        keep = 1.0 - self.w8a8_margin
        return replace(self, cos_mean=1.0 - (1.0 - self.cos_mean) * keep, cos_p1=1.0 - (1.0 - self.cos_p1) * keep)

    def met(self, f: "Fidelity") -> bool:
        ok = f.cos_mean >= self.cos_mean and f.cos_p1 >= self.cos_p1
        if f.spearman_expected is not None:
            # decide on signal: the expected loss (see expected_spearman_delta) is steady where the realized delta of
            # ~1,000 pairs is not (real SmolLM2, 1,379 test pairs: three int8 forms differing only in a rotation seed
            # realized -0.47, +0.07, -0.75 at expected -0.29, -0.27, -0.25; docs/int8.md)
            ok = ok and abs(f.spearman_expected) <= max(self.spearman_delta, 2.0 * (f.spearman_expected_noise or 0.0))
        if f.spearman_delta is not None:
            # the realized delta guards against error aligned with the gold scores, which the expectation cannot see:
            # that is its departure from the expected loss, refused past twice its noise floor (a few hundred pairs
            # cannot resolve 0.3 points). The expected loss itself is judged above. (Real SmolLM2's folded CPU form,
            # 964 STSB-dev pairs: realized -0.35 at expected -0.06, floor 0.16; on all 1,379 test pairs -0.11 to +0.10)
            aligned = f.spearman_delta - (f.spearman_expected or 0.0)
            ok = ok and abs(aligned) <= max(self.spearman_delta, 2.0 * (f.spearman_noise or 0.0))
        return ok


@dataclass
class Fidelity:
    cos_mean: float
    cos_p1: float
    cos_min: float
    spearman_delta: float | None = None  # points
    spearman_ref: float | None = None
    spearman_noise: float | None = None  # std of the realized delta under the candidate's own error, permuted (points)
    # the loss the candidate's error causes on average: spearman_ref * (rho - 1), rho = rank correlation of the
    # candidate's pair scores with the reference's (error independent of the gold scores attenuates a correlation by
    # that factor), and the std of that estimate over bootstrap resamples of the pairs (points)
    spearman_expected: float | None = None
    spearman_expected_noise: float | None = None
    n: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(x, y).statistic)


def fidelity(ref: np.ndarray, cand: np.ndarray, pairs_ref: np.ndarray | None = None, pairs_cand: np.ndarray | None = None,
             gold: np.ndarray | None = None) -> Fidelity:
    c = row_cosine(ref, cand)
    f = Fidelity(cos_mean=float(c.mean()), cos_p1=float(np.percentile(c, 1)), cos_min=float(c.min()), n=len(c))
    if pairs_ref is not None and pairs_cand is not None and gold is not None:
        n = len(gold)
        s_ref = spearman((pairs_ref[:n] * pairs_ref[n:]).sum(1), gold)
        s_cand = spearman((pairs_cand[:n] * pairs_cand[n:]).sum(1), gold)
        f.spearman_ref, f.spearman_delta = s_ref * 100, (s_cand - s_ref) * 100
        f.spearman_noise = spearman_noise(pairs_ref, pairs_cand, gold)
        f.spearman_expected, f.spearman_expected_noise = expected_spearman_delta(pairs_ref, pairs_cand, s_ref * 100)
    return f


def expected_spearman_delta(pairs_ref: np.ndarray, pairs_cand: np.ndarray, spearman_ref: float,
                            draws: int = 40) -> tuple[float, float]:
    """(expected ΔSpearman, its bootstrap std), in points. A candidate's scores ``s' = s + e`` correlate with the
    gold scores ``g`` by ``corr(g, s) * corr(s, s')`` when ``e`` is independent of ``g``, so the loss it causes on
    average is ``spearman_ref * (corr(s, s') - 1)``: no gold label enters ``corr(s, s')``, which is why it is far
    steadier than the realized ΔSpearman of a few hundred pairs (rank correlations throughout)."""
    n = len(pairs_ref) // 2
    s = (pairs_ref[:n] * pairs_ref[n:]).sum(1)
    c = (pairs_cand[:n] * pairs_cand[n:]).sum(1)
    rng = np.random.default_rng(0)
    boot = [spearman(s[i], c[i]) for i in (rng.integers(0, n, n) for _ in range(draws))]
    return spearman_ref * (spearman(s, c) - 1.0), float(np.std([spearman_ref * (b - 1.0) for b in boot]))


def spearman_noise(pairs_ref: np.ndarray, pairs_cand: np.ndarray, gold: np.ndarray, draws: int = 20) -> float:
    """Noise floor of the realized Spearman delta on these pairs (points): its std when the candidate's own per-text
    error vectors (candidate - reference) are re-assigned to texts at random (seeded). That keeps the error's size and
    its few shared directions, and drops only its alignment with the pairs. On real SmolLM2 (1,379 STSB test pairs)
    it gave 0.29-0.37 where the realized deltas of three rotation seeds had a std of 0.34, while isotropic noise of
    the same mean cosine gave 0.19-0.21 (docs/int8.md)."""
    err = pairs_cand - pairs_ref
    if not np.abs(err).max(initial=0.0) > 1e-7:
        return 0.0
    n = len(gold)
    rng = np.random.default_rng(0)
    base = spearman((pairs_ref[:n] * pairs_ref[n:]).sum(1), gold)
    out = []
    for _ in range(draws):
        e = pairs_ref + err[rng.permutation(len(err))]
        e /= np.linalg.norm(e, axis=1, keepdims=True)
        out.append((spearman((e[:n] * e[n:]).sum(1), gold) - base) * 100)
    return float(np.std(out))


def fake_weight(w: Any) -> Any:
    import torch

    s = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / QMAX
    return torch.clamp(torch.round(w / s), -QMAX, QMAX) * s


def pooled_rows(mask: Any) -> Any:
    """Each text's pooled position, the last attended one as last-token pooling takes it: argmax(mask * position)."""
    import torch

    return (mask.long() * torch.arange(mask.shape[1])).argmax(1)


@contextlib.contextmanager
def fake_quant(model: Any, modes: dict[str, str], thresholds: dict[str, float], prefix: int = 0,
               pooled: bool = False) -> Iterator[None]:
    """Temporarily quantize linears per ``modes`` (weights swapped in one layer at a time, inside its forward);
    W8A8 inputs keep their first ``prefix`` positions float, and with ``pooled`` each text's pooled row (as the
    Q/DQ graph does; the model must be called with an ``attention_mask`` keyword)."""
    import torch

    mods = linear_modules(model)
    state: dict[str, Any] = {}

    def grab_mask(_m: Any, _args: Any, kwargs: dict[str, Any]) -> None:
        state["last"] = pooled_rows(kwargs["attention_mask"])

    handles = [model.register_forward_pre_hook(grab_mask, with_kwargs=True)] if pooled else []

    def pre(name: str, mode: str):
        def fn(mod: Any, args: tuple[Any, ...]) -> Any:
            mod._sfr_orig = mod.weight.data
            mod.weight.data = fake_weight(mod.weight.data.float()).to(mod._sfr_orig.dtype)
            if mode == "w8a8":
                s = act_scale(thresholds[name])
                x = args[0]
                xq = torch.clamp(torch.round(x / s), -QMAX, QMAX) * s
                if prefix and x.dim() == 3:
                    xq = torch.cat([x[:, :prefix], xq[:, prefix:]], dim=1)
                if pooled and x.dim() == 3:
                    rows = torch.arange(x.shape[0])
                    xq[rows, state["last"]] = x[rows, state["last"]]
                return (xq, *args[1:])
            return None
        return fn

    def post(mod: Any, _args: Any, _out: Any) -> None:
        mod.weight.data = mod._sfr_orig
        del mod._sfr_orig

    for name, mode in modes.items():
        if mode in ("w8a8", "w8"):
            m = mods[name]
            handles += [m.register_forward_pre_hook(pre(name, mode)), m.register_forward_hook(post)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@dataclass
class Evaluator:
    """Embeds held-out texts (and scored pairs) with the torch model under a quantization config."""

    embed: Callable[[Sequence[Any]], np.ndarray]  # batches -> embeddings in order
    holdout_batches: Sequence[Any]
    pair_batches: Sequence[Any] | None = None
    gold: np.ndarray | None = None
    ref: np.ndarray | None = None
    pairs_ref: np.ndarray | None = None
    calls: int = 0
    prefix: int = 0  # leading positions W8A8 keeps float (see fake_quant)
    pooled: bool = False  # W8A8 keeps each text's pooled row float (see fake_quant)

    def reference(self) -> None:
        self.ref = self.embed(self.holdout_batches)
        self.pairs_ref = self.embed(self.pair_batches) if self.pair_batches else None

    def __call__(self, model: Any, modes: dict[str, str], thresholds: dict[str, float], *, pairs: bool = True,
                 subset: int | None = None) -> Fidelity:
        assert self.ref is not None, "call reference() first"
        self.calls += 1
        hb = self.holdout_batches if subset is None else self.holdout_batches[:subset]
        with fake_quant(model, modes, thresholds, self.prefix, self.pooled):
            cand = self.embed(hb)
            pc = self.embed(self.pair_batches) if (pairs and self.pair_batches) else None
        ref = self.ref[: len(cand)]
        return fidelity(ref, cand, self.pairs_ref if pc is not None else None, pc, self.gold if pc is not None else None)


@dataclass
class Selection:
    modes: dict[str, str]
    fidelity: Fidelity
    met: bool
    sensitivity_w8a8: dict[str, float] = field(default_factory=dict)  # 1 - mean cos with only this layer W8A8
    sensitivity_w8: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    float_reasons: dict[str, str] = field(default_factory=dict)
    sensitivity_kind: str = ""


def layer_sensitivity(model: Any, names: Sequence[str], thresholds: dict[str, float], evaluate: Evaluator, mode: str,
                      subset: int | None) -> dict[str, float]:
    out = {}
    for n in names:
        f = evaluate(model, {n: mode}, thresholds, pairs=False, subset=subset)
        out[n] = 1.0 - f.cos_mean
    return out


def local_sensitivity(model: Any, names: Sequence[str], thresholds: dict[str, float], rows: dict[str, np.ndarray],
                      mode: str) -> dict[str, float]:
    """Relative output error of each linear alone under ``mode`` on its sampled calibration input rows
    (``||Q(X) Q(W)^T - X W^T||^2 / ||X W^T||^2``): the cheap per-layer sensitivity for models with many linears."""
    import torch

    mods = linear_modules(model)
    out = {}
    with torch.inference_mode():
        for n in names:
            x = torch.from_numpy(np.asarray(rows[n], dtype=np.float32))
            if x.shape[0] == 0:
                out[n] = 0.0
                continue
            w = mods[n].weight.detach().float()
            ref = x @ w.T
            xq = x
            if mode == "w8a8":
                s = act_scale(thresholds[n])
                xq = torch.clamp(torch.round(x / s), -QMAX, QMAX) * s
            err = xq @ fake_weight(w).T - ref
            out[n] = float((err ** 2).sum() / (ref ** 2).sum().clamp(min=1e-30))
    return out


class _ModeSearch:
    """The state of one mixed-precision search: the model, its evaluator, the targets and the history of tries."""

    def __init__(self, model: Any, names: Sequence[str], thresholds: dict[str, float], evaluate: Evaluator,
                 targets: Targets, say: Callable[[str], None], sens_subset: int | None,
                 rows: dict[str, np.ndarray] | None, e2e_max_layers: int):
        self.model, self.names, self.thresholds, self.evaluate = model, list(names), thresholds, evaluate
        self.targets, self.strict_targets, self.say = targets, targets.with_margin(), say
        self.sens_subset, self.rows = sens_subset, rows
        self.local = rows is not None and len(self.names) > e2e_max_layers
        self.order: list[str] = []
        self.sel = Selection(modes={}, fidelity=Fidelity(0, 0, 0), met=False, history=[])
        self.sel.sensitivity_kind = ("local output error on calibration rows" if self.local
                                     else "1 - mean cosine on held-out texts with only this layer quantized")

    def run(self, modes: dict[str, str], label: str, pairs: bool = True, goal: Targets | None = None) -> Fidelity:
        goal = goal or self.targets
        f = self.evaluate(self.model, modes, self.thresholds, pairs=pairs)
        self.sel.history.append({"config": label, **f.to_dict(), "met": goal.met(f),
                                 "goal": {"cos_mean": round(goal.cos_mean, 6), "cos_p1": round(goal.cos_p1, 6)}})
        dsp = f.spearman_delta if f.spearman_delta is None else round(f.spearman_delta, 2)
        self.say(f"{label}: cos {f.cos_mean:.5f} p1 {f.cos_p1:.5f} dSp {dsp}")
        return f

    def sensitivity(self, mode: str) -> dict[str, float]:
        self.say(f"per-layer {mode} sensitivity of {len(self.names)} linears ({'local' if self.local else 'end-to-end'})")
        if self.local:
            assert self.rows is not None
            return local_sensitivity(self.model, self.names, self.thresholds, self.rows, mode)
        return layer_sensitivity(self.model, self.names, self.thresholds, self.evaluate, mode, self.sens_subset)

    def config(self, k: int, floats: Sequence[str] = ()) -> dict[str, str]:
        """The ``k`` least W8A8-sensitive linears in W8A8, ``floats`` in float, the rest weight-only."""
        m = {n: "w8" for n in self.names}
        for n in self.order[:k]:
            m[n] = "w8a8"
        for n in floats:
            m[n] = "float"
        return m

    def best_w8a8(self) -> tuple[int, Fidelity] | None:
        """Search on cosine alone (cheap), then confirm with the task score, backing off while it misses. Weight-only
        is scored on the pairs only when it is the answer: each scored pass embeds every held-out pair text (real
        SmolLM2: ~2,760 texts, minutes in torch), and the W8A8 form that is kept is scored in its own pass."""
        self.sel.sensitivity_w8a8 = self.sensitivity("w8a8")
        self.order = sorted(self.names, key=lambda n: self.sel.sensitivity_w8a8[n])
        f0 = self.run(self.config(0), "weight-only (cosine only)", pairs=False)
        if not self.targets.met(f0):
            return None
        lo, hi = 0, len(self.order) + 1  # the largest k meeting the cosine target
        while hi - lo > max(1, len(self.order) // 32):
            mid = (lo + hi) // 2
            f = self.run(self.config(mid), f"w8a8 x{mid} (cosine only)", pairs=False, goal=self.strict_targets)
            lo, hi = (mid, hi) if self.strict_targets.met(f) else (lo, mid)
        k = lo
        while k > 0:
            f = self.run(self.config(k), f"w8a8 x{k}", goal=self.strict_targets)
            if self.strict_targets.met(f):
                return k, f
            k //= 2
        f0 = self.run(self.config(0), "weight-only")
        return (0, f0) if self.targets.met(f0) else None

    def accept(self, k: int, f: Fidelity) -> Selection:
        sel = self.sel
        sel.modes, sel.fidelity, sel.met = self.config(k), f, True
        for n in self.order[k:]:
            sel.float_reasons[n] = (f"activation kept float (weight-only int8): W8A8 sensitivity "
                                    f"{sel.sensitivity_w8a8.get(n, 0):.2e}")
        return sel

    def with_floats(self, strict: bool) -> Selection:
        """Weight-only everywhere misses the target: move the most weight-sensitive linears to float."""
        sel = self.sel
        self.say("weight-only misses the target: measuring weight-only sensitivity")
        sel.sensitivity_w8 = self.sensitivity("w8")
        worst = sorted(self.names, key=lambda n: -sel.sensitivity_w8[n])
        lo, hi = 0, max(1, int(len(self.names) * self.targets.max_float_fraction))
        f_hi = self.run(self.config(0, worst[:hi]), f"float x{hi}")
        if not self.targets.met(f_hi):
            t = self.targets
            msg = (f"fidelity targets (cos mean >= {t.cos_mean}, p1 >= {t.cos_p1}, |dSpearman| <= {t.spearman_delta}) "
                   f"cannot be met with at most {hi} of {len(self.names)} MatMuls in float; best reached: cos mean "
                   f"{f_hi.cos_mean:.5f}, p1 {f_hi.cos_p1:.5f}, dSpearman {f_hi.spearman_delta}")
            if strict:
                raise FidelityGateError(msg)
            log.warning(msg)
            sel.modes, sel.fidelity, sel.met = self.config(0, worst[:hi]), f_hi, False
        else:
            best_m, best_f = hi, f_hi
            while hi - lo > 1:
                mid = (lo + hi) // 2
                f = self.run(self.config(0, worst[:mid]), f"float x{mid}")
                if self.targets.met(f):
                    hi, best_m, best_f = mid, mid, f
                else:
                    lo = mid
            sel.modes, sel.fidelity, sel.met = self.config(0, worst[:best_m]), best_f, True
        self._float_reasons()
        return sel

    def _float_reasons(self) -> None:
        sel = self.sel
        for n in self.names:
            if sel.modes[n] == "float":
                sel.float_reasons[n] = f"kept float: weight-only sensitivity {sel.sensitivity_w8[n]:.2e} (among the worst)"
            elif sel.modes[n] == "w8":
                sel.float_reasons[n] = "activation kept float (weight-only int8)"


def choose_modes(model: Any, names: Sequence[str], thresholds: dict[str, float], evaluate: Evaluator,
                 targets: Targets, *, allow_w8a8: bool = True, sens_subset: int | None = 16,
                 strict: bool = False, progress: Callable[[str], None] | None = None,
                 rows: dict[str, np.ndarray] | None = None, e2e_max_layers: int = 64) -> Selection:
    """Fidelity-targeted mixed precision (see module doc). ``strict`` raises FidelityGateError (with the best
    fidelity reached) when the targets cannot be met within ``targets.max_float_fraction`` float layers."""
    search = _ModeSearch(model, names, thresholds, evaluate, targets, progress or (lambda _m: None), sens_subset,
                         rows, e2e_max_layers)
    if allow_w8a8:
        best = search.best_w8a8()
    else:
        f0 = search.run(search.config(0), "weight-only")
        best = (0, f0) if targets.met(f0) else None
    if best is not None:
        return search.accept(*best)
    return search.with_floats(strict)
