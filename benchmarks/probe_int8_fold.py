"""Fake-quantization probe on real SmolLM2 (demo:smollm2): the QuaRot residual-stream fold, what it costs, and
whether keeping the residual stream's massive channels out of the rotation recovers it.

Rows (every linear W8A8: int8 weights per output channel, per-token int8 activations, ``row8``'s arithmetic):

- ``rot``: the calibrate stage's rotation (``--rotation on``): an online rotation right before every linear but
  ``o_proj``, after the RMSNorm scale. Nothing else changes.
- ``fold``: QuaRot's fold. Each RMSNorm scale is folded into the linears that read it, the residual stream is
  rotated once by a seeded random orthogonal ``Q`` (folded into the embedding table, into every reader's rows and
  every writer's columns), and the final norm's input is rotated back (``h Q^T``), so the pooled embedding is
  unchanged in float. ``down_proj`` keeps an online rotation (nothing to fold into); ``o_proj`` is left alone,
  as in ``rot``.
- ``+keepK``: the K residual channels with the largest typical magnitude (median |x| over the build's calibration
  texts, past position 0, max over layers) stay out of ``Q`` (it is the identity on them) and reach every reader
  in float: the reader quantizes the other channels per token and adds the K channels' float product (an
  LLM.int8()-style split; K/576 of the readers' multiply-adds stay float).
- ``+identK``: as ``+keepK`` (``Q`` the identity on them, ``g`` kept on them), but the K channels are quantized per
  token with the rest: no float split.
- ``+downK``: ``down_proj``'s input is not rotated online; its K input channels of largest median |x| (per layer,
  on the calibration texts) stay float instead (``+down0``: plain per-token int8 there).
- ``+downhad``: ``down_proj``'s online rotation is the random-sign block-Hadamard factor alone (64-channel
  blocks), without the orthogonal factor that mixes the blocks (one MatMul instead of two and a Transpose);
  ``+downhadN``: in N-channel blocks (N a power of two up to 64; the online MatMul's cost is linear in N).
- ``+pos0``: position 0 (the attention sink) keeps float activations everywhere.
- ``+exact``: each text's first attended row and its pooled (last attended) row keep float activations everywhere:
  what the CPU form's second int8 digit on those rows approximates (``QuantPlan.pooled_exact``/``first_exact``).

Why the fold costs fidelity (the hypothesis this probe tests): before the fold, the norm scale ``g`` shrinks the
massive channels before the quantizer sees them; after the fold the quantizer sees ``norm(x) Q`` whose per-token
scale is set by the massive channels, and its noise is then multiplied by ``g`` in every channel.

    OMP_NUM_THREADS=2 python benchmarks/probe_int8_fold.py --rows rot,fold,fold+keep4,fold+keep8 --out /tmp/fold.json

``--set BIOSSES`` (or STS13-16) probes another STS set's pairs; ``--seeds 0,1,2`` repeats every row with each
rotation seed, which shows how far one build's realized delta on a small set moves with its random rotation alone.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_int8 import DATA, OTHER_STS, cos_rows, sts_score, stsb_test  # noqa: E402
from probe_int8_torch import _copy, _load, _row  # noqa: E402

from sfr_export.quant.fold import massive_channels, residual_rotation  # noqa: E402
from sfr_export.quant.observe import QMAX  # noqa: E402

READERS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")


@dataclass(frozen=True)
class FoldRow:
    name: str
    fold: bool
    keep: int = 0
    pos0: bool = False
    exact: bool = False  # each text's first and pooled rows float in every linear input
    ident: bool = False  # the kept channels stay out of Q (g kept on them) but are quantized with the rest
    down: int = -1  # -1: down_proj's input rotated online; K >= 0: not rotated, its K most massive channels float
    down_hadamard: int = 0  # > 0: down_proj's online rotation is a random-sign block-Hadamard alone, blocks of this size

    @classmethod
    def parse(cls, name: str) -> "FoldRow":
        base, *opts = name.split("+")
        num = {o.rstrip("0123456789"): int(o[len(o.rstrip("0123456789")):]) for o in opts if o[-1:].isdigit()}
        known = all(o in ("pos0", "downhad", "exact") or o.rstrip("0123456789") in ("keep", "ident", "down", "downhad") and o[-1:].isdigit() for o in opts)
        if base not in ("rot", "fold") or not known or (num and base != "fold") or ("keep" in num and "ident" in num):
            raise SystemExit(f"unknown row {name!r}: rot[+pos0] or fold[+keepK|+identK][+downK|+downhad[N]][+pos0][+exact]")
        had = num.get("downhad", 64 if "downhad" in opts else 0)
        return cls(name, fold=base == "fold", keep=num.get("keep", num.get("ident", 0)), pos0="pos0" in opts, exact="exact" in opts,
                   ident="ident" in num, down=num.get("down", -1), down_hadamard=had)


def down_channels(model: Any, batches: list[Any], k: int) -> dict[str, Any]:
    """Per down_proj: the ``k`` input channels of largest median |x| over the calibration tokens past position 0."""
    import torch

    from sfr_export.quant.observe import linear_modules

    mods = {n: m for n, m in linear_modules(model).items() if n.endswith("down_proj")}
    stats: dict[str, list[Any]] = {n: [] for n in mods}
    hooks = [m.register_forward_pre_hook(lambda _m, a, n=n: stats[n].append(a[0][:, 1:].abs().flatten(0, 1).float()))
             for n, m in mods.items()]
    try:
        with torch.inference_mode():
            for b in batches:
                model(input_ids=torch.from_numpy(b.input_ids), attention_mask=torch.from_numpy(b.attention_mask))
    finally:
        for h in hooks:
            h.remove()
    return {n: torch.cat(v).median(dim=0).values.topk(k).indices.sort().values for n, v in stats.items()}


def fold_residual(model: Any, q: Any, keep: tuple[int, ...]) -> None:
    """QuaRot's fold in torch, in place (float64 products), as sfr_export.quant.fold writes it into the graph: ``Q``
    into the embedding table, the readers' rows and the writers' columns; each norm keeps g on ``keep`` and the rest's
    mean elsewhere (a constant commutes with ``Q``), the ratio folded into its readers; a pre-hook rotates the final
    norm's input back."""
    import torch

    def put(mod: Any, w: Any) -> None:
        mod.weight.copy_(w.to(mod.weight.dtype))

    with torch.no_grad():
        put(model.embed_tokens, model.embed_tokens.weight.double() @ q)
        for layer in model.layers:
            for norm, readers in ((layer.input_layernorm, (layer.self_attn.q_proj, layer.self_attn.k_proj,
                                                           layer.self_attn.v_proj)),
                                  (layer.post_attention_layernorm, (layer.mlp.gate_proj, layer.mlp.up_proj))):
                g = norm.weight.double()
                rest = np.setdiff1d(np.arange(g.shape[0]), keep)
                kept = g.clone()
                kept[rest] = g[rest].mean()
                for lin in readers:
                    put(lin, (lin.weight.double() * (g / kept)) @ q)
                put(norm, kept)
            for writer in (layer.self_attn.o_proj, layer.mlp.down_proj):
                put(writer, q.T @ writer.weight.double())
    qt = q.T.float()
    model.norm.register_forward_pre_hook(lambda _m, a: (a[0] @ qt.to(a[0].dtype), *a[1:]))


_ROWS: dict[str, Any] = {}  # the batch's first and pooled row per text (set by w8a8's model pre-hook), for +exact


def _fake(x: Any, keep: Any, pos0: bool, exact: bool = False) -> Any:
    """Per-token symmetric int8 of ``x``; the channels ``keep`` (may be empty) and, with ``pos0``, position 0 float;
    with ``exact``, each text's first and pooled rows float."""
    import torch

    xr = x.clone()
    if keep is not None:
        xr[..., keep] = 0
    s = xr.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / QMAX
    xq = torch.clamp(torch.round(xr / s), -QMAX, QMAX) * s
    if keep is not None:
        xq[..., keep] = x[..., keep]
    if pos0 and x.dim() == 3:
        xq[:, :1] = x[:, :1]
    if exact and x.dim() == 3:
        b = torch.arange(x.shape[0])
        for rows in (_ROWS["first"], _ROWS["pooled"]):
            xq[b, rows] = x[b, rows]
    return xq


@contextlib.contextmanager
def w8a8(model: Any, row: FoldRow, keep: dict[str, Any]) -> Iterator[None]:
    """Every linear: int8 weights (per output channel) for the forward, per-token int8 inputs; a linear named in
    ``keep`` keeps those input channels float, in the activation and in the weight's columns."""
    from sfr_export.quant.observe import linear_modules
    from sfr_export.quant.sensitivity import fake_weight

    saved, handles = [], []
    for name, m in linear_modules(model).items():
        saved.append((m, m.weight.data))
        k = keep.get(name)
        w = m.weight.data.float().clone()
        if k is not None:  # the float channels' weight columns stay float too: they are the float product's
            w[:, k] = 0
        wq = fake_weight(w)
        if k is not None:
            wq[:, k] = m.weight.data.float()[:, k]
        m.weight.data = wq.to(m.weight.dtype)
        handles.append(m.register_forward_pre_hook(lambda _m, a, k=k: (_fake(a[0], k, row.pos0, row.exact), *a[1:])))
    handles.append(model.register_forward_pre_hook(_note_rows, with_kwargs=True))
    try:
        yield
    finally:
        for m, w in saved:
            m.weight.data = w
        for h in handles:
            h.remove()


def _note_rows(_m: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Record each text's first and last attended row of the batch the model is about to run (either padding side)."""
    mask = kwargs["attention_mask"]
    last = mask.shape[1] - 1 - mask.flip(1).argmax(1)
    _ROWS.update(first=mask.argmax(1), pooled=last)


def _hadamard_only(model: Any, seed: int, nb: int) -> None:
    """``down_proj``'s input times the stage's random-sign block-Hadamard factor alone, in blocks of ``nb`` channels."""
    import torch

    from sfr_export.quant.observe import linear_modules
    from sfr_export.quant.rotation import _rotate_input, make_rotation

    for n, mod in linear_modules(model).items():
        if n.endswith("down_proj"):
            r = make_rotation(int(mod.weight.shape[1]), seed).block_only(nb)
            with torch.no_grad():
                mod.weight.copy_(torch.from_numpy(r.apply(mod.weight.detach().double().numpy())).to(mod.weight.dtype))
            mod.register_forward_pre_hook(_rotate_input(r))


def prepare(model: Any, row: FoldRow, calib: list[Any], seed: int) -> tuple[Any, dict[str, Any]]:
    """A rotated copy of ``model`` for ``row``, and the float input channels of each linear that has some."""
    import torch

    from sfr_export.quant.observe import linear_modules
    from sfr_export.quant.rotation import rotate_model
    from sfr_export.stages.calibrate import CPU_ROTATION_SKIP

    m = _copy(model, "float32")
    names = list(linear_modules(m))
    if not row.fold:
        rotate_model(m, [n for n in names if not n.endswith(CPU_ROTATION_SKIP)], seed=seed)
        return m, {}
    keep = massive_channels(model, calib, row.keep) if row.keep else ()
    fold_residual(m, torch.from_numpy(residual_rotation(m.config.hidden_size, keep, seed)), keep)
    floats = {n: torch.tensor(keep) for n in names if n.endswith(READERS)} if row.keep and not row.ident else {}
    if row.down_hadamard:
        _hadamard_only(m, seed, row.down_hadamard)
    elif row.down < 0:
        rotate_model(m, [n for n in names if n.endswith("down_proj")], seed=seed)
    elif row.down > 0:
        floats.update(down_channels(m, calib, row.down))
    return m, floats


def sts_pairs(name: str, cap: int) -> tuple[list[str], list[str], np.ndarray]:
    """The first ``cap`` pairs of STSBenchmark's test split or of another STS set of the shared data."""
    from sfr_export.eval.loaders import Limits, load_task

    if name == "STSBenchmark":
        s1, s2, gold = stsb_test()
    else:
        fmt = dict(OTHER_STS).get(name)
        if fmt is None:
            raise SystemExit(f"unknown set {name!r}: STSBenchmark or one of {', '.join(n for n, _ in OTHER_STS)}")
        t = load_task(DATA / name, name, fmt, Limits())
        s1, s2, gold = list(t.sentences1), list(t.sentences2), np.array(t.scores)
    return s1[:cap], s2[:cap], gold[:cap]


def main() -> None:
    import torch

    from sfr_export.quant.recipe import load_recipe, sample_recipe
    from sfr_export.stages.calibrate import make_batches, torch_embedder

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="rot,fold,fold+keep4,fold+keep8")
    ap.add_argument("--seeds", default="0", help="rotation seeds, comma-separated: every row runs with each")
    ap.add_argument("--set", default="STSBenchmark", help="STSBenchmark (test split) or STS13-16 / BIOSSES")
    ap.add_argument("--pairs", type=int, default=1379)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="/tmp/sfr-probe-fold.json")
    ap.add_argument("--no-float-check", action="store_true", help="skip the folded float model's pass (min cos)")
    args = ap.parse_args()
    rows = [FoldRow.parse(r) for r in args.rows.split(",")]
    model, tt, spec = _load(args.threads)
    cal = sample_recipe(load_recipe("default", samples=64, holdout=24), tt, spec).calibration
    calib = make_batches(tt, [c.text for c in cal], 8)
    s1, s2, gold = sts_pairs(args.set, args.pairs)
    seeds = [int(v) for v in args.seeds.split(",")]
    batches = make_batches(tt, spec.apply_prompt(s1 + s2, "STSBenchmark"), 32)
    ref = torch_embedder(model, spec)(batches)
    res: dict[str, Any] = {"set": args.set, "pairs": len(gold), "spearman_ref": sts_score(ref, gold), "seeds": seeds,
                           "massive_channels": massive_channels(model, calib, 16), "rows": []}
    print(json.dumps({k: v for k, v in res.items() if k != "rows"}), flush=True)
    for row, seed in ((r, s) for r in rows for s in seeds):
        t = time.time()
        m, keep = prepare(model, row, calib, seed)
        with torch.inference_mode():
            exact = float(cos_rows(ref, torch_embedder(m, spec)(batches)).min()) if row.fold and not args.no_float_check \
                else None
            with w8a8(m, row, keep):
                cand = torch_embedder(m, spec)(batches)
        out = {**_row(row.name, ref, cand, gold, time.time() - t), "seed": seed, "float_fold_min_cos": exact}
        res["rows"].append(out)
        print(json.dumps(out), flush=True)
    Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
