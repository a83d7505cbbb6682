"""Long inputs: seconds, tokens/s, peak extra RSS and cosine to torch for each backend, one fresh process per cell.

Backends (same random ids everywhere, right padded):
- ``torch``: transformers with ``attn_implementation="sdpa"`` and the padding mask (the reference);
- ``ort-attention``: the export's standard form (one ONNX ``Attention`` node per layer, opset 23), ONNX Runtime CPU;
- ``ort-cpu`` (also ``ort-gqa`` / ``ort-mha``): its CPU form ``model.cpu.onnx`` (``com.microsoft.GroupQueryAttention``
  for a causal model, ``com.microsoft.MultiHeadAttention`` with a 2-D key-padding mask for an encoder);
- ``ort-legacy``: an ONNX file given with ``--legacy-onnx`` (e.g. an ``--opset 18`` export, whose attention is
  MatMul/Softmax over L x L scores);
- ``ort-int8``: an int8-cpu ``model.onnx`` given with ``--int8-onnx`` (the calibrate stage's CPU form).

    flock /tmp/sfr-heavy.lock python benchmarks/bench_long_inputs.py --model demo:smollm2 \\
        --lengths 512,1024,2048,4096 --batches 1,4 --threads 2 [--legacy-onnx /tmp/legacy/onnx/fp32/model.onnx]
    flock /tmp/sfr-heavy.lock python benchmarks/bench_long_inputs.py --model demo:minilm --lengths 128,512 --batches 4 \
        --backends torch,ort-attention,ort-mha

Each cell loads its backend, resets the peak RSS (``/proc/self/clear_refs``), runs one warm-up and ``--repeats``
timed calls; "extra MB" is VmHWM minus VmRSS at the reset, i.e. the forward pass's own peak. Rows of a B=4 batch
have lengths L, 3L/4, L/2 and L/4. Prints a table and the slope of extra memory per 1,024 tokens, and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SEED = 20241202


def _status_mb(field: str) -> float:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"no {field} in /proc/self/status")


def make_batch(length: int, batch: int, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(SEED + length)
    lens = [length] if batch == 1 else [max(1, length * (4 - i) // 4) for i in range(batch)]
    ids = rng.integers(10, vocab - 1, size=(batch, length)).astype(np.int64)
    mask = np.zeros_like(ids)
    for r, n in enumerate(lens):
        mask[r, :n] = 1
        ids[r, n:] = 0
    return ids, mask


def _runner(backend: str, model_dir: str, onnx_dir: str, given: dict[str, str], threads: int):
    from sfr_export.models import resolve_model

    spec = resolve_model(model_dir, compute_fingerprint=False).spec
    if backend == "torch":
        import torch

        from sfr_export.runtime.torch_runner import TorchRunner

        torch.set_num_threads(threads)
        r = TorchRunner(resolve_model(model_dir, compute_fingerprint=False).local_dir, spec)
    else:
        from sfr_export.runtime.ort_runner import OrtRunner

        cpu = Path(onnx_dir) / "model.cpu.onnx"
        path = {"ort-attention": Path(onnx_dir) / "model.onnx", "ort-cpu": cpu, "ort-gqa": cpu, "ort-mha": cpu,
                **{k: Path(v) for k, v in given.items()}}[backend]
        r = OrtRunner(path, intra_op_threads=threads)
    r.activate()
    return r


def _given(a: argparse.Namespace) -> dict[str, str]:
    """Backends that run an ONNX file named on the command line."""
    return {k: v for k, v in (("ort-legacy", a.legacy_onnx), ("ort-int8", a.int8_onnx)) if v}


def run_cell(a: argparse.Namespace) -> None:
    r = _runner(a.cell, a.model, a.onnx_dir, _given(a), a.threads)
    ids, mask = make_batch(a.length, a.batch, a.vocab)
    with open("/proc/self/clear_refs", "w") as fh:  # reset VmHWM to the current RSS
        fh.write("5")
    base = _status_mb("VmRSS")
    emb = r.infer(ids, mask)
    times = []
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        r.infer(ids, mask)
        times.append(time.perf_counter() - t0)
    extra = _status_mb("VmHWM") - base
    np.save(a.emb_out, emb)
    print(json.dumps({"seconds": statistics.median(times), "extra_mb": extra, "tokens": int(mask.sum())}))


def _cell(a: argparse.Namespace, backend: str, length: int, batch: int, emb: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
    cmd = [sys.executable, __file__, "--cell", backend, "--model", a.model, "--onnx-dir", str(a.onnx_dir),
           "--length", str(length), "--batch", str(batch), "--threads", str(a.threads), "--repeats", str(a.repeats),
           "--vocab", str(a.vocab), "--emb-out", str(emb)]
    for flag, path in (("--legacy-onnx", a.legacy_onnx), ("--int8-onnx", a.int8_onnx)):
        if path:
            cmd += [flag, path]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        return {"error": (p.stderr.strip().splitlines() or ["?"])[-1][:200]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def _vocab_size(model: str) -> int:
    from transformers import AutoConfig

    from sfr_export.models import resolve_model

    return int(AutoConfig.from_pretrained(str(resolve_model(model, compute_fingerprint=False).local_dir)).vocab_size)


def export_forms(model: str, out: Path) -> Path:
    """The export's fp32 standard form and CPU form (validation off: the cells compare with torch themselves)."""
    from sfr_export.models import resolve_model
    from sfr_export.stages.export import ExportConfig, run_export

    rec = run_export(out, resolve_model(model), ExportConfig(precision="fp32", validate=False, low_memory="off"))
    return out / Path(next(x.path for x in rec.artifacts if x.kind == "onnx")).parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo:smollm2")
    ap.add_argument("--lengths", default="512,1024,2048,4096")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--backends", default="torch,ort-attention,ort-gqa")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=1, help="passes over the backends per shape, alternating (median)")
    ap.add_argument("--vocab", type=int, default=None, help="ids are drawn below this (default: the model's vocab)")
    ap.add_argument("--legacy-onnx", default=None)
    ap.add_argument("--int8-onnx", default=None, help="backend ort-int8: an int8-cpu model.onnx (e.g. onnx/int8-cpu)")
    ap.add_argument("--onnx-dir", default=None, help="an export's onnx/fp32 dir (default: export into a temp dir)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--cell", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--length", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--emb-out", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.cell:
        return run_cell(a)
    a.vocab = a.vocab or _vocab_size(a.model)
    backends = a.backends.split(",") + [b for b in _given(a) if b not in a.backends]
    tmp = Path(tempfile.mkdtemp(prefix="bench-long-"))
    a.onnx_dir = a.onnx_dir or str(export_forms(a.model, tmp / "artifact"))
    rows = []
    print(f"model {a.model}, threads {a.threads}, median of {a.repeats} calls x {a.rounds} alternating rounds, fresh "
          "process per cell", flush=True)
    print(f"{'L':>5} {'B':>2} {'backend':<14} {'s':>8} {'tok/s':>8} {'extra MB':>9} {'x torch':>8} {'cos':>9}")
    for length in (int(x) for x in a.lengths.split(",")):
        for batch in (int(x) for x in a.batches.split(",")):
            rows += _shape(a, length, batch, backends, tmp)
    _slopes(rows)
    if a.json:
        a.json.write_text(json.dumps(rows, indent=2))


def _shape(a: argparse.Namespace, length: int, batch: int, backends: list[str], tmp: Path) -> list[dict]:
    """Every backend at one (L, B): ``--rounds`` passes over the backends, alternating, each cell a fresh process;
    seconds are the median over the passes, extra MB the largest."""
    order = ["torch"] + [b for b in backends if b != "torch"]
    runs: dict[str, list[dict]] = {be: [] for be in order}
    for _ in range(a.rounds):
        for be in order:
            runs[be].append(_cell(a, be, length, batch, tmp / f"{be}-{length}-{batch}.npy"))
    ref_e = np.load(tmp / f"torch-{length}-{batch}.npy") if "error" not in runs["torch"][0] else None
    ref_t = statistics.median(r["seconds"] for r in runs["torch"]) if ref_e is not None else None
    rows = []
    for be, rs in runs.items():
        if any("error" in r for r in rs):
            print(f"{length:>5} {batch:>2} {be:<14} ERROR {next(r['error'] for r in rs if 'error' in r)}", flush=True)
            rows.append({"L": length, "B": batch, "backend": be, **rs[0]})
            continue
        sec = statistics.median(r["seconds"] for r in rs)
        e = np.load(tmp / f"{be}-{length}-{batch}.npy")
        row = {"L": length, "B": batch, "backend": be, **rs[0], "seconds": sec, "seconds_per_round": [r["seconds"] for r in rs],
               "extra_mb": max(r["extra_mb"] for r in rs), "cos_min": float((e * ref_e).sum(1).min()) if ref_e is not None else None,
               "vs_torch": sec / ref_t if ref_t else None}
        print(f"{length:>5} {batch:>2} {be:<14} {sec:>8.3f} {row['tokens'] / sec:>8.0f} {row['extra_mb']:>9.0f} "
              f"{row['vs_torch'] or 0:>7.2f}x {row['cos_min'] or 0:>9.6f}", flush=True)
        rows.append(row)
    return rows


def _slopes(rows: list[dict]) -> None:
    """Least-squares slope of extra MB per 1,024 tokens, per backend and batch (linear in L means a flat slope)."""
    print("\nextra MB per 1,024 tokens of L (least squares over the lengths):")
    keys = sorted({(r["backend"], r["B"]) for r in rows if "extra_mb" in r})
    for be, b in keys:
        pts = [(r["L"], r["extra_mb"]) for r in rows if r["backend"] == be and r["B"] == b and "extra_mb" in r]
        if len(pts) >= 2:
            x, y = np.array(pts, dtype=float).T
            slope = np.polyfit(x, y, 1)[0] * 1024
            print(f"  {be:<14} B={b}: {slope:8.1f} MB / 1k tokens  (points: {', '.join(f'{int(l)}:{m:.0f}' for l, m in pts)})")


if __name__ == "__main__":
    main()
