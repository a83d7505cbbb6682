"""SmoothQuant (Xiao et al. 2023): move activation outliers into the weights with exact per-channel rescaling.

For a group of linears that read the same activation X, ``s_j = max|X_j|^a / max|W_j|^(1-a)``; X is divided by s
where it is produced (a norm weight, or the output rows of the linear before it) and every consumer's weight
columns are multiplied by s. In exact arithmetic nothing changes; the fold is checked numerically by the caller.

Groups, for Llama/Mistral/Qwen2-style decoders (RMSNorm, no biases) and BERT-style encoders:
- ``input_layernorm`` -> q/k/v_proj; ``post_attention_layernorm`` -> gate/up_proj (norm fold)
- ``up_proj`` -> ``down_proj`` (the down_proj input is act(gate) * up, linear in up's output rows): this is where
  decoder outliers live;
- ``v_proj`` -> ``o_proj`` (the attention output is linear in v; with GQA each v channel feeds several o channels).
BERT's post-LN outputs also feed the residual, so only its value -> attention.output.dense fold is exact.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import UserInputError
from .observe import QMAX, LinearStats

log = logging.getLogger(__name__)

ALPHA_GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
WEIGHT_ONLY_GROWTH = 1.5  # auto alpha: smoothing may raise a group's weight-only int8 error at most this much


@dataclass(frozen=True)
class FoldGroup:
    producer: str  # module name of the norm or linear that produces X
    kind: str  # "norm" | "linear"
    consumers: tuple[str, ...]
    repeat: int = 1  # GQA: each producer channel feeds `repeat` consumer channels (per head block)
    head_dim: int = 0


def fold_groups(model: Any) -> list[FoldGroup]:
    """Find the exact fold groups of a supported architecture (empty when none is known)."""
    groups: list[FoldGroup] = []
    cfg = getattr(model, "config", None)
    mods = dict(model.named_modules())
    for name, mod in mods.items():
        attn, mlp = mods.get(f"{name}.self_attn"), mods.get(f"{name}.mlp")
        if attn is not None and mlp is not None and f"{name}.input_layernorm" in mods:
            norm1, norm2 = mods[f"{name}.input_layernorm"], mods.get(f"{name}.post_attention_layernorm")
            if "gemma" in type(norm1).__name__.lower() or getattr(norm1, "bias", None) is not None:
                continue  # (1 + w) norms or biased norms: not handled
            groups.append(FoldGroup(f"{name}.input_layernorm", "norm",
                                    tuple(f"{name}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj"))))
            if norm2 is not None and f"{name}.mlp.gate_proj" in mods:
                groups.append(FoldGroup(f"{name}.post_attention_layernorm", "norm",
                                        (f"{name}.mlp.gate_proj", f"{name}.mlp.up_proj")))
            if f"{name}.mlp.up_proj" in mods and f"{name}.mlp.down_proj" in mods:
                groups.append(FoldGroup(f"{name}.mlp.up_proj", "linear", (f"{name}.mlp.down_proj",)))
            if cfg is not None and f"{name}.self_attn.o_proj" in mods:
                n_heads = int(cfg.num_attention_heads)
                n_kv = int(getattr(cfg, "num_key_value_heads", None) or n_heads)
                head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads)
                groups.append(FoldGroup(f"{name}.self_attn.v_proj", "linear", (f"{name}.self_attn.o_proj",),
                                        repeat=n_heads // n_kv, head_dim=head_dim))
        if f"{name}.attention.self.value" in mods and f"{name}.attention.output.dense" in mods:
            groups.append(FoldGroup(f"{name}.attention.self.value", "linear", (f"{name}.attention.output.dense",)))
    return groups


def _to_producer_channels(v: np.ndarray, g: FoldGroup, reduce: str = "max") -> np.ndarray:
    """Consumer-input channels -> producer-output channels (GQA: max over the query heads sharing a kv head)."""
    if g.repeat <= 1:
        return v
    n_heads = v.shape[0] // g.head_dim
    v = v.reshape(n_heads // g.repeat, g.repeat, g.head_dim)
    return v.max(axis=1).reshape(-1)


def _to_consumer_channels(s: np.ndarray, g: FoldGroup) -> np.ndarray:
    if g.repeat <= 1:
        return s
    n_kv = s.shape[0] // g.head_dim
    return np.repeat(s.reshape(n_kv, 1, g.head_dim), g.repeat, axis=1).reshape(-1)


def group_scales(g: FoldGroup, weights: dict[str, np.ndarray], stats: dict[str, LinearStats], alpha: float) -> np.ndarray:
    """Scales per producer channel. ``weights`` are torch-layout [out, in] arrays of the consumers."""
    x_max = _to_producer_channels(stats[g.consumers[0]].channel_absmax, g)
    w_max = _to_producer_channels(np.max([np.abs(weights[c]).max(axis=0) for c in g.consumers], axis=0), g)
    s = np.power(np.maximum(x_max, 1e-5), alpha) / np.power(np.maximum(w_max, 1e-5), 1.0 - alpha)
    return np.clip(s, 1e-4, 1e4).astype(np.float32)


def _fake_q_rows(x: np.ndarray) -> np.ndarray:
    s = max(float(np.abs(x).max()), 1e-8) / QMAX
    return np.clip(np.rint(x / s), -QMAX, QMAX) * s


def _fake_q_weight(w: np.ndarray) -> np.ndarray:
    s = np.maximum(np.abs(w).max(axis=1, keepdims=True), 1e-12) / QMAX
    return np.clip(np.rint(w / s), -QMAX, QMAX) * s


def group_error(g: FoldGroup, weights: dict[str, np.ndarray], stats: dict[str, LinearStats], s: np.ndarray | None,
                *, activations: bool = True) -> float:
    """Relative W8A8 (``activations=False``: weight-only int8) output error of the group's consumers on the sampled
    rows after smoothing by ``s``."""
    x = stats[g.consumers[0]].sample()
    if x.shape[0] == 0:
        return 0.0
    sc = _to_consumer_channels(s, g) if s is not None else np.ones(x.shape[1], np.float32)
    xq = _fake_q_rows(x / sc) if activations else x / sc
    num = den = 0.0
    for c in g.consumers:
        w = weights[c]
        ref = x @ w.T
        out = xq @ _fake_q_weight(w * sc).T
        num += float(((out - ref) ** 2).sum())
        den += float((ref ** 2).sum())
    return num / max(den, 1e-30)


def choose_alpha(g: FoldGroup, weights: dict[str, np.ndarray], stats: dict[str, LinearStats],
                 grid: tuple[float, ...] = ALPHA_GRID, max_weight_only_growth: float = WEIGHT_ONLY_GROWTH
                 ) -> tuple[float | None, float, float]:
    """Best alpha of ``grid`` for this group by W8A8 output error on calibration rows, among the alphas that raise
    the weight-only int8 error at most ``max_weight_only_growth`` times (a layer the search leaves weight-only must
    not pay for smoothing: on SmolLM2, folding the ~3000x first-token outliers into down_proj took weight-only int8
    from cos 0.999 to 0.992); None when no smoothing wins. Returns (alpha, error_before, error_after)."""
    base = group_error(g, weights, stats, None)
    w_base = group_error(g, weights, stats, None, activations=False)
    best: tuple[float | None, float] = (None, base)
    for a in grid:
        s = group_scales(g, weights, stats, a)
        e = group_error(g, weights, stats, s)
        if e < best[1] and group_error(g, weights, stats, s, activations=False) <= max_weight_only_growth * w_base:
            best = (a, e)
    return best[0], base, best[1]


def apply_fold(model: Any, g: FoldGroup, s: np.ndarray) -> None:
    """Divide the producer's output channels by ``s`` and multiply the consumers' input columns by it (in place)."""
    import torch

    mods = dict(model.named_modules())
    prod = mods[g.producer]
    st = torch.from_numpy(s).to(prod.weight.dtype)
    with torch.no_grad():
        if g.kind == "norm":
            prod.weight.div_(st)
        else:
            prod.weight.div_(st.view(-1, 1))
            if getattr(prod, "bias", None) is not None:
                prod.bias.div_(st)
        sc = torch.from_numpy(_to_consumer_channels(s, g)).to(prod.weight.dtype)
        for c in g.consumers:
            mods[c].weight.mul_(sc.view(1, -1))


def smooth_model(model: Any, stats: dict[str, LinearStats], alpha: float | str) -> dict[str, Any]:
    """Apply SmoothQuant to every fold group. ``alpha`` is a number in [0, 1] or "auto" (per-group search).
    Returns a report: groups, chosen alphas, W8A8 output error before/after per group."""
    if alpha != "auto" and not (isinstance(alpha, (int, float)) and 0.0 <= float(alpha) <= 1.0):
        raise UserInputError(f"smoothquant alpha must be in [0, 1] or 'auto', got {alpha!r}")
    groups = [g for g in fold_groups(model) if all(c in stats for c in g.consumers)]
    mods = dict(model.named_modules())
    report: dict[str, Any] = {"alpha": alpha, "groups": len(groups), "applied": 0, "per_group": {}}
    for g in groups:
        weights = {c: mods[c].weight.detach().float().cpu().numpy() for c in g.consumers}
        if alpha == "auto":
            a, before, after = choose_alpha(g, weights, stats)
        else:
            a = float(alpha)
            before = group_error(g, weights, stats, None)
            after = group_error(g, weights, stats, group_scales(g, weights, stats, a))
        report["per_group"][g.producer] = {"alpha": a, "err_before": before, "err_after": after}
        if a is None:
            continue
        s = group_scales(g, weights, stats, a)
        apply_fold(model, g, s)
        # keep the observed stats consistent with the smoothed model (consumers now see X / s)
        sc = _to_consumer_channels(s, g)
        for c in g.consumers:
            st = stats[c]
            st.channel_absmax = st.channel_absmax / sc
            st.rows = [r / sc for r in st.rows]
            st.absmax = float(st.channel_absmax.max())
        report["applied"] += 1
    return report
