"""Peak RSS of ONNX export for a Mistral with the real widths: low-memory path vs normal path.

Builds randomly initialised Mistral-7B-shaped checkpoints (hidden 4096, intermediate 14336, 32 heads, 8 KV heads,
vocab 32000; fp16 safetensors, one shard per layer, laid out like the SFR hub repo with the demo:tiny-mistral
tokenizer) with 2 and 4 layers, exports each in fp32 and fp16 through both paths (each export is the real export
stage, whose worker runs in its own subprocess and reports ``worker_peak_rss_mb``), prints a table and extrapolates
peak RSS linearly in the layer count to 32 layers (Mistral-7B).

Each export runs as ``python bench_export_memory.py --one …``: a fresh process that calls the export stage, whose worker subprocess does the export. Peak RSS: the low-memory path records its own peak
(``export_peak_rss_mb``, from VmHWM, before any validation); the normal path's figure is the worker's
``worker_peak_rss_mb`` (ru_maxrss). On Linux ru_maxrss survives exec, so a worker reports at least the peak of the
process that spawned it; that floor (the ``--one`` process's own VmHWM when it starts the export, a few hundred MB)
is printed and is far below the normal path's peaks. This parent process never imports torch.

Export runs with validation off, so the worker's peak is the export's own peak. With ``--validate`` (default) the
low-memory exports are validated against PyTorch in the same worker (both padding sides); their export peak is then
the figure the low-memory path records before validation (``export_peak_rss_mb``) and the worker peak including
validation is shown beside it. The 4-layer fp32 low-memory export is not validated by default
(``--validate-max-gb``): the fp32 torch reference and the ORT session would each hold another 4 GB.

The whole run holds ``/tmp/sfr-heavy.lock`` (flock(2), the lock of ``flock /tmp/sfr-heavy.lock CMD``), taken once
so that other heavy jobs do not interleave with (and slow down) the series; ``--no-lock`` when the caller holds it.

    python benchmarks/bench_export_memory.py                  # 2 and 4 layers, fp32 + fp16, both paths
    python benchmarks/bench_export_memory.py --layers 2 --paths lowmem --precisions fp16
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

LOCK = Path("/tmp/sfr-heavy.lock")
MISTRAL_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                  num_key_value_heads=8, max_position_embeddings=32768, sliding_window=4096, rms_norm_eps=1e-5,
                  rope_theta=10000.0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
GIB = 1024 ** 3


@contextlib.contextmanager
def heavy_lock():
    """Serialise heavy runs with the other engineers on this machine (flock(2), like `flock /tmp/sfr-heavy.lock`)."""
    with open(LOCK, "a+") as fh:
        t0 = time.time()
        fcntl.flock(fh, fcntl.LOCK_EX)
        waited = time.time() - t0
        if waited > 1:
            print(f"  (waited {waited:.0f}s for {LOCK})", flush=True)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def param_counts(layers: int, cfg: dict = MISTRAL_7B) -> tuple[int, int]:
    """(matrix parameters, norm parameters) of a MistralModel (no LM head)."""
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = cfg["num_key_value_heads"] * (h // cfg["num_attention_heads"])
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i
    return v * h + layers * per_layer, (2 * layers + 1) * h


def weight_bytes(layers: int, precision: str) -> int:
    """Bytes of the exported weights: fp16 keeps the norm weights in fp32 (same policy on both paths)."""
    mats, norms = param_counts(layers)
    return mats * (2 if precision == "fp16" else 4) + norms * 4


def make_wide_mistral(out: Path, layers: int, *, seed: int = 0, shards_from: Path | None = None) -> Path:
    """A Mistral-7B-shaped model dir with ``layers`` layers and random fp16 weights, one safetensors shard per layer.

    ``shards_from``: a dir made with at least as many layers; its shards are hard-linked instead of regenerated.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import MistralConfig, MistralModel

    from sfr_export.models import resolve_model

    out.mkdir(parents=True, exist_ok=True)
    tiny = resolve_model("demo:tiny-mistral", compute_fingerprint=False).local_dir
    for p in tiny.iterdir():  # tokenizer, sentence-transformers files (pooling, prompts, max length)
        if p.name in ("config.json", "model.safetensors"):
            continue
        (shutil.copytree if p.is_dir() else shutil.copyfile)(p, out / p.name)
    cfg = MistralConfig(num_hidden_layers=layers, **MISTRAL_7B)
    cfg.architectures = ["MistralModel"]
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    with torch.device("meta"):
        skeleton = MistralModel(cfg)
    groups: dict[str, list[tuple[str, tuple[int, ...]]]] = {}
    for name, p in skeleton.state_dict().items():
        shard = f"layer{int(name.split('.')[1]):02d}" if name.startswith("layers.") else "embed"
        groups.setdefault(shard, []).append((name, tuple(p.shape)))
    weight_map = {}
    gen = torch.Generator().manual_seed(seed)
    for shard, entries in groups.items():
        fname = f"model-{shard}.safetensors"
        weight_map.update({n: fname for n, _ in entries})
        if shards_from is not None and (shards_from / fname).is_file():
            (out / fname).hardlink_to(shards_from / fname)
            continue
        tensors = {}
        for name, shape in entries:
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shape, dtype=torch.float16)
            else:
                tensors[name] = (torch.randn(shape, generator=gen) * 0.02).to(torch.float16)
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        del tensors
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    return out


@dataclass
class Run:
    layers: int
    precision: str
    path: str  # lowmem | normal
    validated: bool
    export_peak_mb: float
    worker_peak_mb: float
    seconds: float
    data_bytes: int
    min_cosine: float | None
    spawn_floor_mb: float
    graph_peak_mb: float  # low-memory path: peak after tracing, before any weight is read


def _vm_hwm_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as fh:
        return next(int(line.split()[1]) / 1024.0 for line in fh if line.startswith("VmHWM:"))


def one_export(model_dir: Path, out_dir: Path, precision: str, path: str, validate: bool) -> dict:
    """Body of ``--one``: run the export stage once; returns its figures plus the spawn floor (see module doc)."""
    from sfr_export.models import resolve_model
    from sfr_export.stages.export import ExportConfig, run_export

    model = resolve_model(str(model_dir), compute_fingerprint=False)
    cfg = ExportConfig(precision=precision, validate=validate, low_memory="on" if path == "lowmem" else "off")
    shutil.rmtree(out_dir, ignore_errors=True)
    from sfr_export.stages.common import prepare_output

    prepare_output(out_dir, model)  # tokenizer/spec written before the floor is read, as run_export would
    floor = _vm_hwm_mb()
    t0 = time.time()
    rec = run_export(out_dir, model, cfg, force=True)
    figures = dict(rec.figures)
    figures["wall_seconds"] = time.time() - t0
    figures["spawn_floor_mb"] = floor
    figures["onnx_bytes"] = sum(p.stat().st_size for p in (out_dir / "onnx" / precision).iterdir())
    shutil.rmtree(out_dir, ignore_errors=True)
    return figures


def run_one(model_dir: Path, out_dir: Path, layers: int, precision: str, path: str, validate: bool) -> Run:
    """One export in its own process (the caller holds the heavy lock)."""
    job = json.dumps({"model_dir": str(model_dir), "out_dir": str(out_dir), "precision": precision, "path": path,
                      "validate": validate})
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", job]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"export {layers} layers {precision} {path} failed (exit {proc.returncode})")
    f = json.loads(lines[-1][7:])
    if f.get("low_memory") != (path == "lowmem"):
        raise SystemExit(f"the export stage took the {'low-memory' if f.get('low_memory') else 'normal'} path, asked {path}")
    worker = float(f["worker_peak_rss_mb"])
    if path == "lowmem":
        export_peak = float(f["export_peak_rss_mb"])
    elif validate:
        raise SystemExit("the normal path records no export-only peak; run it with validation off")
    else:
        export_peak = worker
        if worker <= f["spawn_floor_mb"] * 1.05:
            print(f"  warning: the worker peak {worker:.0f} MB is at the spawn floor {f['spawn_floor_mb']:.0f} MB", flush=True)
    cos = (f.get("validation") or {}).get("min_cosine")
    return Run(layers, precision, path, validate, export_peak, worker, float(f["wall_seconds"]),
               int(f["onnx_bytes"]), cos, float(f["spawn_floor_mb"]), float(f.get("graph_peak_rss_mb") or 0.0))


def extrapolate(runs: list[Run], target: int) -> list[tuple[str, str, float, float]]:
    """Linear fit of peak RSS in the layer count (two smallest/largest layer counts) -> (path, precision, peak, weights)."""
    out = []
    for path in ("lowmem", "normal"):
        for prec in ("fp32", "fp16"):
            rs = sorted((r for r in runs if r.path == path and r.precision == prec), key=lambda r: r.layers)
            if len(rs) < 2:
                continue
            a, b = rs[0], rs[-1]
            slope = (b.export_peak_mb - a.export_peak_mb) / (b.layers - a.layers)
            out.append((path, prec, b.export_peak_mb + slope * (target - b.layers), weight_bytes(target, prec) / 2**20))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--precisions", nargs="+", default=["fp32", "fp16"], choices=["fp32", "fp16"])
    ap.add_argument("--paths", nargs="+", default=["lowmem", "normal"], choices=["lowmem", "normal"])
    ap.add_argument("--validate", action=argparse.BooleanOptionalAction, default=True,
                    help="validate the low-memory exports against PyTorch (the normal path runs unvalidated)")
    ap.add_argument("--validate-max-gb", type=float, default=3.0,
                    help="skip validation of exports whose weights exceed this many GB (default 3: all but 4-layer fp32)")
    ap.add_argument("--workdir", type=Path, default=None, help="where the checkpoints go (default: a temp dir)")
    ap.add_argument("--target-layers", type=int, default=32)
    ap.add_argument("--json", type=Path, default=None, help="also write the runs as JSON here")
    ap.add_argument("--no-lock", action="store_true", help=f"do not take {LOCK} (the caller holds it)")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: one export (JSON job)
    ap.add_argument("--build", nargs=3, default=None, help=argparse.SUPPRESS)  # internal: DIR LAYERS SHARDS_FROM|-
    args = ap.parse_args()
    if args.one:
        job = json.loads(args.one)
        figures = one_export(Path(job["model_dir"]), Path(job["out_dir"]), job["precision"], job["path"], job["validate"])
        print("RESULT " + json.dumps(figures, default=str), flush=True)
        return
    if args.build:
        d, n, src = args.build
        make_wide_mistral(Path(d), int(n), shards_from=None if src == "-" else Path(src))
        return

    with contextlib.nullcontext() if args.no_lock else heavy_lock():
        runs = run_all(args)
    report(runs, args)


def run_all(args: argparse.Namespace) -> list[Run]:
    work = Path(tempfile.mkdtemp(prefix="sfr-bench-mem-", dir=args.workdir))
    runs: list[Run] = []
    try:
        biggest = None
        for layers in sorted(args.layers, reverse=True):  # build the biggest first, hard-link its shards for the others
            print(f"building a {layers}-layer Mistral-7B-shaped checkpoint (random fp16 weights)…", flush=True)
            d = work / f"mistral-{layers}l"
            subprocess.run([sys.executable, str(Path(__file__).resolve()), "--build", str(d), str(layers),
                            str(biggest or "-")], check=True)
            biggest = biggest or d
        for layers in sorted(args.layers):
            for prec in args.precisions:
                for path in args.paths:
                    validate = (args.validate and path == "lowmem"
                                and weight_bytes(layers, prec) <= args.validate_max_gb * 1e9)
                    print(f"export {layers} layers {prec} {path}{' + validation' if validate else ''}…", flush=True)
                    r = run_one(work / f"mistral-{layers}l", work / "out", layers, prec, path, validate)
                    runs.append(r)
                    print(f"  export peak {r.export_peak_mb:,.0f} MB, worker peak {r.worker_peak_mb:,.0f} MB "
                          f"(spawn floor {r.spawn_floor_mb:,.0f} MB), {r.seconds:.0f}s" + (f", min cosine {r.min_cosine:.6f}" if r.min_cosine is not None else ""),
                          flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return runs


def report(runs: list[Run], args: argparse.Namespace) -> None:
    print()
    print("| layers | precision | path | weights (MiB) | export peak RSS (MiB) | peak - weights (MiB) | graph-only peak (MiB) | "
          "worker peak incl. validation (MiB) | validation min cos | seconds |")
    print("|---:|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in runs:
        w = weight_bytes(r.layers, r.precision) / 2**20
        g = f"{r.graph_peak_mb:,.0f}" if r.path == "lowmem" else "-"
        print(f"| {r.layers} | {r.precision} | {r.path} | {w:,.0f} | {r.export_peak_mb:,.0f} | {r.export_peak_mb - w:+,.0f} | {g} | "
              f"{f'{r.worker_peak_mb:,.0f}' if r.validated else '-'} | "
              f"{'%.6f' % r.min_cosine if r.min_cosine is not None else 'not validated'} | {r.seconds:.0f} |")
    print()
    print(f"Extrapolation to {args.target_layers} layers (linear in the layer count); goal: peak <= weights + 1 GiB")
    print("| path | precision | weights (GiB) | predicted peak (GiB) | peak - weights (GiB) | goal met | fits 24 GiB |")
    print("|---|---|---:|---:|---:|---|---|")
    for path, prec, peak, w in extrapolate(runs, args.target_layers):
        print(f"| {path} | {prec} | {w / 1024:.2f} | {peak / 1024:.2f} | {(peak - w) / 1024:+.2f} | "
              f"{'yes' if peak <= w + 1024 else 'no'} | {'yes' if peak <= 24 * 1024 else 'no'} |")
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ for r in runs], indent=1))


if __name__ == "__main__":
    main()
