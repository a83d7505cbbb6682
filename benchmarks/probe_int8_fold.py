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
- ``+pos0``: position 0 (the attention sink) keeps float activations everywhere.

Why the fold costs fidelity (the hypothesis this probe tests): before the fold, the norm scale ``g`` shrinks the
massive channels before the quantizer sees them; after the fold the quantizer sees ``norm(x) Q`` whose per-token
scale is set by the massive channels, and its noise is then multiplied by ``g`` in every channel.

    OMP_NUM_THREADS=2 python benchmarks/probe_int8_fold.py --rows rot,fold,fold+keep4,fold+keep8 --out /tmp/fold.json
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
from bench_int8 import cos_rows, sts_score, stsb_test  # noqa: E402
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

    @classmethod
    def parse(cls, name: str) -> "FoldRow":
        base, *opts = name.split("+")
        keep = [int(o[4:]) for o in opts if o.startswith("keep") and o[4:].isdigit()]
        known = all(o == "pos0" or (o.startswith("keep") and o[4:].isdigit()) for o in opts)
        if base not in ("rot", "fold") or not known or (keep and base != "fold"):
            raise SystemExit(f"unknown row {name!r}: rot[+pos0] or fold[+keepK][+pos0]")
        return cls(name, fold=base == "fold", keep=max(keep, default=0), pos0="pos0" in opts)


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


def _fake(x: Any, keep: Any, pos0: bool) -> Any:
    """Per-token symmetric int8 of ``x``; the channels ``keep`` (may be empty) and, with ``pos0``, position 0 float."""
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
    return xq


@contextlib.contextmanager
def w8a8(model: Any, row: FoldRow, keep: Any) -> Iterator[None]:
    """Every linear: int8 weights (per output channel) for the forward, per-token int8 inputs; the readers of a
    folded model keep the channels ``keep`` float, in the activation and in the weight's columns."""
    from sfr_export.quant.observe import linear_modules
    from sfr_export.quant.sensitivity import fake_weight

    saved, handles = [], []
    for name, m in linear_modules(model).items():
        saved.append((m, m.weight.data))
        k = keep if row.fold and name.endswith(READERS) else None
        w = m.weight.data.float().clone()
        if k is not None:  # the float channels' weight columns stay float too: they are the float product's
            w[:, k] = 0
        wq = fake_weight(w)
        if k is not None:
            wq[:, k] = m.weight.data.float()[:, k]
        m.weight.data = wq.to(m.weight.dtype)
        handles.append(m.register_forward_pre_hook(lambda _m, a, k=k: (_fake(a[0], k, row.pos0), *a[1:])))
    try:
        yield
    finally:
        for m, w in saved:
            m.weight.data = w
        for h in handles:
            h.remove()


def prepare(model: Any, row: FoldRow, calib: list[Any], seed: int) -> tuple[Any, Any]:
    """A rotated copy of ``model`` for ``row``, and the float channels of its readers (or None)."""
    import torch

    from sfr_export.quant.observe import linear_modules
    from sfr_export.quant.rotation import rotate_model
    from sfr_export.stages.calibrate import CPU_ROTATION_SKIP

    m = _copy(model, "float32")
    names = list(linear_modules(m))
    if not row.fold:
        rotate_model(m, [n for n in names if not n.endswith(CPU_ROTATION_SKIP)], seed=seed)
        return m, None
    keep = massive_channels(model, calib, row.keep) if row.keep else ()
    fold_residual(m, torch.from_numpy(residual_rotation(m.config.hidden_size, keep, seed)), keep)
    rotate_model(m, [n for n in names if n.endswith("down_proj")], seed=seed)
    return m, (torch.tensor(keep) if row.keep else None)


def main() -> None:
    import torch

    from sfr_export.quant.recipe import load_recipe, sample_recipe
    from sfr_export.stages.calibrate import make_batches, torch_embedder

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="rot,fold,fold+keep4,fold+keep8")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pairs", type=int, default=1379)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="/tmp/sfr-probe-fold.json")
    ap.add_argument("--no-float-check", action="store_true", help="skip the folded float model's pass (min cos)")
    args = ap.parse_args()
    rows = [FoldRow.parse(r) for r in args.rows.split(",")]
    model, tt, spec = _load(args.threads)
    cal = sample_recipe(load_recipe("default", samples=64, holdout=24), tt, spec).calibration
    calib = make_batches(tt, [c.text for c in cal], 8)
    s1, s2, gold = (v[: args.pairs] for v in stsb_test())
    batches = make_batches(tt, spec.apply_prompt(s1 + s2, "STSBenchmark"), 32)
    ref = torch_embedder(model, spec)(batches)
    res: dict[str, Any] = {"pairs": len(gold), "spearman_ref": sts_score(ref, gold), "seed": args.seed,
                           "massive_channels": massive_channels(model, calib, 16), "rows": []}
    print(json.dumps({k: v for k, v in res.items() if k != "rows"}), flush=True)
    for row in rows:
        t = time.time()
        m, keep = prepare(model, row, calib, args.seed)
        with torch.inference_mode():
            exact = float(cos_rows(ref, torch_embedder(m, spec)(batches)).min()) if row.fold and not args.no_float_check \
                else None
            with w8a8(m, row, keep):
                cand = torch_embedder(m, spec)(batches)
        out = {**_row(row.name, ref, cand, gold, time.time() - t), "float_fold_min_cos": exact}
        res["rows"].append(out)
        print(json.dumps(out), flush=True)
    Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
