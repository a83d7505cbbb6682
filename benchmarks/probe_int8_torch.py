"""Fake-quantization probe on the real SmolLM2 decoder (demo:smollm2): what each int8 lever does to the embedding,
on all 1,379 STSBenchmark test pairs, beside torch bf16 / fp16 (the same model, no quantization).

Every row embeds the same texts the way the artifact does (the spec's STS prompt, EOS, last-token pooling, L2 norm,
batches by length) and compares with the torch fp32 reference:

- ``bf16`` / ``fp16``: the whole model cast, nothing quantized (how far plain half precision moves the metric);
- ``w8`` / ``a8`` / ``w8a8``: per-output-channel int8 weights and/or per-token symmetric int8 activations
  (``row8``'s arithmetic) on every linear, optionally after the calibrate stage's online rotation (every linear
  input except ``o_proj``'s) with a given seed, optionally with position 0 (the attention-sink token, whose
  activations reach |x| ~ 3,250) left float, optionally with each text's pooled row left float (``+last``);
  ``@q_proj/k_proj`` limits a row to the linears so named;
- ``+static``: TensorRT's int8 instead, one static per-tensor scale per linear input (abs-max over the build's own
  calibration texts, recipe ``default`` with the CI's 64 samples, past position 0 with ``+pos0``); ``+rotall``
  rotates every linear input, ``o_proj``'s too, as the Q/DQ form does.

For each row it also reports the build gate's statistics (``sfr_export.quant.sensitivity``): the **noise floor** of
the realized ΔSpearman (the candidate's own per-text error vectors re-assigned to texts at random, std over the
permutations) and the **expected ΔSpearman** (``spearman_ref * (rho - 1)``, ``rho`` = rank correlation of the
candidate's pair scores with the reference's, ``rho_scores``). Compare them with the spread of the realized
ΔSpearman across rotation seeds (``--seeds``): equally good quantizers.

    OMP_NUM_THREADS=2 python benchmarks/probe_int8_torch.py --rows fp16,bf16,w8,a8,w8a8,w8a8+rot,w8a8+rot+pos0 \
        --seeds 0,1,2 --out /tmp/probe.json
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
from bench_int8 import cos_rows, spearman_figures, sts_score, stsb_test  # noqa: E402

from sfr_export.quant.observe import QMAX  # noqa: E402  (the int8 range every fake quantization uses)


@dataclass(frozen=True)
class Lever:
    """One probe row, parsed from ``w8a8+rot+pos0`` style names."""

    name: str
    dtype: str = "float32"  # bf16 / fp16 rows: the whole model cast
    weights: bool = False
    acts: bool = False
    rotate: bool = False
    pos0_float: bool = False
    last_float: bool = False  # +last: each text's last attended position (the pooled token) keeps float activations
    block: int = 0  # +g32 / +g64 / +g128: activation scales per token and per block of channels (MatMulNBits' int8 compute)
    static: bool = False  # +static: one static per-tensor scale per linear input (TensorRT's int8), from the build's recipe
    rotate_all: bool = False  # +rotall: rotate every linear input, o_proj's too (what the Q/DQ form rotates)
    only: tuple[str, ...] = ()  # quantize only the linears whose name contains one of these ("@down_proj/up_proj")

    @classmethod
    def parse(cls, name: str) -> "Lever":
        head, _, only = name.partition("@")
        base, *opts = head.split("+")
        if base in ("bf16", "fp16"):
            return cls(name, dtype={"bf16": "bfloat16", "fp16": "float16"}[base])
        blocks = {f"g{b}": b for b in (32, 64, 128)}
        if base not in ("w8", "a8", "w8a8") or not set(opts) <= {"rot", "rotall", "pos0", "last", "static", *blocks}:
            raise SystemExit(f"unknown row {name!r}: fp16, bf16, or w8|a8|w8a8 with +rot|rotall, +pos0, +last, "
                             "+static, +g32|g64|g128")
        return cls(name, weights="w8" in base, acts=base.endswith("a8"), rotate=bool({"rot", "rotall"} & set(opts)),
                   pos0_float="pos0" in opts, last_float="last" in opts, static="static" in opts,
                   rotate_all="rotall" in opts, block=max([blocks[o] for o in opts if o in blocks], default=0),
                   only=tuple(x for x in only.split("/") if x))

    def matches(self, linear: str) -> bool:
        return not self.only or any(x in linear for x in self.only)


def parse_row(row: str) -> tuple[Lever, ...]:
    """``w8a8+rot;w8a8+g32@gate_proj/up_proj``: levers separated by ``;``, the last that matches a linear wins."""
    return tuple(Lever.parse(x) for x in row.split(";"))


def _fake_act(x: Any, lever: Lever, last: Any, threshold: float | None = None) -> Any:
    """Per-token (or per-token-per-block, or static per-tensor at ``threshold``) symmetric int8 of a linear's input;
    ``last``: each row's pooled position."""
    import torch

    from sfr_export.quant.observe import act_scale

    k, block = x.shape[-1], lever.block
    xb = x
    if block:  # the last block zero-padded, as MatMulNBits pads K
        xb = torch.nn.functional.pad(x, (0, -k % block))
        xb = xb.reshape(*xb.shape[:-1], -1, block)
    s = act_scale(threshold) if lever.static else xb.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / QMAX
    xq = (torch.clamp(torch.round(xb / s), -QMAX, QMAX) * s).flatten(-2)[..., :k] if block else \
        torch.clamp(torch.round(xb / s), -QMAX, QMAX) * s
    if lever.pos0_float and x.dim() == 3:
        xq = torch.cat([x[:, :1], xq[:, 1:]], dim=1)
    if lever.last_float and x.dim() == 3:
        rows = torch.arange(x.shape[0])
        xq[rows, last] = x[rows, last]
    return xq


@contextlib.contextmanager
def fake_quant(model: Any, levers: tuple[Lever, ...], thresholds: dict[str, float] | None = None) -> Iterator[None]:
    """Per-channel int8 weights (swapped in for the forward) and per-token int8 activations, each linear by the last
    lever of the row that matches it."""
    from sfr_export.quant.observe import linear_modules
    from sfr_export.quant.sensitivity import fake_weight, pooled_rows

    state: dict[str, Any] = {}

    def grab_mask(_m: Any, _args: Any, kwargs: dict[str, Any]) -> None:  # the last attended position
        state["last"] = pooled_rows(kwargs["attention_mask"])

    handles = [model.register_forward_pre_hook(grab_mask, with_kwargs=True)]
    for name, m in linear_modules(model).items():
        lever = next((lv for lv in reversed(levers) if lv.matches(name)), None)
        if lever is None:
            continue
        if lever.weights:
            orig = m.weight.data
            m.weight.data = fake_weight(orig.float()).to(orig.dtype)
            handles.append((m, orig))
        if lever.acts:
            handles.append(m.register_forward_pre_hook(
                lambda _m, a, lv=lever, n=name: (_fake_act(a[0], lv, state.get("last"), (thresholds or {}).get(n)),
                                                 *a[1:])))
    try:
        yield
    finally:
        for h in handles:
            if isinstance(h, tuple):
                h[0].weight.data = h[1]
            else:
                h.remove()


def _load(threads: int) -> tuple[Any, Any, Any]:
    import torch

    from sfr_export.models import load_backbone, load_tokenizer, resolve_model
    from sfr_export.tokenization import TextTokenizer

    torch.set_num_threads(threads)
    rm = resolve_model("demo:smollm2")
    model_dir = Path(rm.local_dir)
    return load_backbone(model_dir, dtype="float32"), TextTokenizer(load_tokenizer(model_dir), rm.spec), rm.spec


def _row(name: str, ref: np.ndarray, cand: np.ndarray, gold: np.ndarray, sec: float) -> dict[str, Any]:
    from sfr_export.quant.sensitivity import spearman

    c = cos_rows(ref, cand)
    sp_ref, n = sts_score(ref, gold), len(gold)
    return {"row": name, "cos_mean": float(c.mean()), "cos_p1": float(np.percentile(c, 1)), "cos_min": float(c.min()),
            "d_spearman": sts_score(cand, gold) - sp_ref, **spearman_figures(ref, cand, gold, sp_ref),
            "rho_scores": spearman((ref[:n] * ref[n:]).sum(1), (cand[:n] * cand[n:]).sum(1)),
            "seconds": round(sec, 1)}


def main() -> None:
    import torch

    from sfr_export.quant.rotation import rotate_model
    from sfr_export.quant.observe import linear_modules
    from sfr_export.stages.calibrate import CPU_ROTATION_SKIP, make_batches, torch_embedder

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="fp16,bf16,w8,a8,w8a8,w8a8+rot,w8a8+rot+pos0")
    ap.add_argument("--seeds", default="0", help="rotation seeds for the +rot rows")
    ap.add_argument("--pairs", type=int, default=1379)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="/tmp/sfr-probe-int8.json")
    args = ap.parse_args()
    rows = [(r, parse_row(r)) for r in args.rows.split(",")]
    model, tt, spec = _load(args.threads)
    s1, s2, gold = stsb_test()
    s1, s2, gold = s1[: args.pairs], s2[: args.pairs], gold[: args.pairs]
    batches = make_batches(tt, spec.apply_prompt(s1 + s2, "STSBenchmark"), 32)
    t = time.time()
    ref = torch_embedder(model, spec)(batches)
    ref_sec = time.time() - t
    res: dict[str, Any] = {"pairs": len(gold), "spearman_ref": sts_score(ref, gold), "ref_seconds": ref_sec, "rows": []}
    print(json.dumps({k: v for k, v in res.items() if k != "rows"}), flush=True)
    np.save(Path(args.out).with_suffix(".ref.npy"), ref)
    for name, levers in rows:
        rotate, dtype = any(lv.rotate for lv in levers), levers[0].dtype
        for seed in ([int(s) for s in args.seeds.split(",")] if rotate else [None]):
            m = model if dtype == "float32" and not rotate else _copy(model, dtype)
            if rotate:
                everything = any(lv.rotate_all for lv in levers)
                rotate_model(m, [n for n in linear_modules(m) if everything or not n.endswith(CPU_ROTATION_SKIP)], seed=seed)
            t = time.time()
            thresholds = _static_thresholds(m, tt, spec, any(lv.pos0_float for lv in levers)) \
                if any(lv.static for lv in levers) else None
            with fake_quant(m, levers, thresholds), torch.inference_mode():
                cand = torch_embedder(m, spec)(batches)
            row = _row(name + ("" if seed is None else f" seed {seed}"), ref, cand, gold, time.time() - t)
            res["rows"].append(row)
            np.save(Path(args.out).with_suffix(f".{len(res['rows'])}.npy"), cand.astype(np.float16))
            print(json.dumps(row), flush=True)
            del m
    Path(args.out).write_text(json.dumps(res, indent=1))


def _static_thresholds(model: Any, tt: Any, spec: Any, skip_first: bool) -> dict[str, float]:
    """Per-linear activation abs-max on the build's own calibration texts (recipe ``default``, the CI's 64 samples),
    attended tokens only, past position 0 when it stays float: the ranges the Q/DQ form's static scales come from."""
    from sfr_export.quant import observe as obs
    from sfr_export.quant.recipe import load_recipe, sample_recipe
    from sfr_export.stages.calibrate import make_batches

    cs = sample_recipe(load_recipe("default", samples=64, holdout=24), tt, spec)
    batches = [(b.input_ids, b.attention_mask) for b in make_batches(tt, [c.text for c in cs.calibration], 8)]
    names = list(obs.linear_modules(model))
    return obs.observe(model, batches, names, obs.ObserveConfig(method="minmax", skip_prefix=int(skip_first)))[1]


def _copy(model: Any, dtype: str) -> Any:
    import copy

    import torch

    return copy.deepcopy(model).to(getattr(torch, dtype))


if __name__ == "__main__":
    main()
