"""Side-by-side benchmark of every backend/variant an output dir holds (``sfr-export bench DIR``).

Each candidate (torch fp32, ONNX Runtime fp32/fp16/int8/int8-cpu/int8-dynamic, TensorRT) runs in a fresh
subprocess, so its peak RSS is its own; all candidates run in one invocation, one after the other, so their ratios
are comparable even on a noisy machine (absolute times are not). Inputs are synthetic token ids of exactly the
requested length (BOS/EOS per spec), fed to the runner directly: tokenization is not timed.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import ArtifactError, SfrExportError, UserInputError
from .manifest import Manifest, atomic_path, atomic_write_text

log = logging.getLogger(__name__)

RESULT_PREFIX = "BENCH-RESULT "


@dataclass(frozen=True)
class BenchConfig:
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    seq_lens: tuple[int, ...] = (32, 128, 512)
    cell_seconds: float = 2.0  # measure each (batch, seq) cell for about this long ...
    min_iters: int = 3  # ... but at least this many timed calls ...
    max_iters: int = 50  # ... and at most this many
    warmup: int = 1
    timeout_s: float = 3600.0  # per candidate subprocess
    threads: int | None = None  # intra-op threads for torch and ONNX Runtime (None: each library's default)
    candidates: tuple[str, ...] = ()  # e.g. ("torch:fp32", "onnxruntime:int8"); empty = everything present

    def __post_init__(self) -> None:
        if not self.batch_sizes or not self.seq_lens or min(self.batch_sizes) < 1 or min(self.seq_lens) < 2:
            raise UserInputError("batch sizes must be >= 1 and sequence lengths >= 2")
        if self.threads is not None and self.threads < 1:
            raise UserInputError(f"threads must be >= 1, got {self.threads}")
        if self.min_iters < 1 or self.max_iters < self.min_iters or self.cell_seconds <= 0:
            raise UserInputError("need 1 <= min_iters <= max_iters and cell_seconds > 0")


@dataclass(frozen=True)
class Candidate:
    backend: str  # torch | onnxruntime | tensorrt
    variant: str  # fp32 | fp16 | int8 | ...

    @property
    def label(self) -> str:
        return f"{'ort' if self.backend == 'onnxruntime' else self.backend} {self.variant}"

    @classmethod
    def parse(cls, text: str) -> "Candidate":
        backend, _, variant = text.partition(":")
        if backend not in ("torch", "onnxruntime", "tensorrt") or not variant:
            raise UserInputError(f"candidate {text!r} must look like torch:fp32, onnxruntime:int8 or tensorrt:fp16")
        return cls(backend, variant)


def find_candidates(root: Path) -> list[Candidate]:
    """torch fp32 (when the model dir is still there), every ONNX variant, TensorRT when an engine and TRT exist."""
    from .runtime.embedder import _tensorrt_ready, onnx_variants

    m = Manifest.load(root)
    out: list[Candidate] = []
    local = m.model.get("local_dir")
    if local and Path(local).is_dir():
        out.append(Candidate("torch", "fp32"))
    order = ["fp32", "fp16", "int8", "int8-cpu", "int8-dynamic"]
    variants = onnx_variants(m)
    for v in sorted(variants, key=lambda v: (order.index(v) if v in order else len(order), v)):
        out.append(Candidate("onnxruntime", v))
    if _tensorrt_ready(m):
        rec = m.stage("engine")
        out.append(Candidate("tensorrt", str((rec.config if rec else {}).get("precision", "engine"))))
    return out


def model_bytes(root: Path, cand: Candidate) -> int:
    m = Manifest.load(root)
    if cand.backend == "torch":
        return sum(p.stat().st_size for p in Path(m.model["local_dir"]).glob("*.safetensors"))
    if cand.backend == "tensorrt":
        rec = m.stage("engine")
        return sum(a.bytes for a in rec.artifacts if a.kind == "engine") if rec else 0
    from .runtime.embedder import onnx_variants

    rec = m.stage(onnx_variants(m)[cand.variant])
    return sum(a.bytes for a in rec.artifacts if a.kind.startswith("onnx")) if rec else 0


# ---- the worker (one candidate, one fresh process) --------------------------------------------------------------
def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _synthetic(tok: Any, batch: int, seq: int, seed: int) -> tuple[Any, Any]:
    """Random ordinary tokens (ids 1000..min(vocab, 30000), past every special token) with BOS/EOS per spec."""
    import numpy as np

    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, min(tok.vocab_size, 30000), size=(batch, seq))
    if tok.bos_id is not None:
        ids[:, 0] = tok.bos_id
    if tok.eos_id is not None:
        ids[:, -1] = tok.eos_id
    return ids.astype(np.int64), np.ones((batch, seq), dtype=np.int64)


def run_candidate(root: Path, cand: Candidate, cfg: BenchConfig) -> dict[str, Any]:
    """Load one candidate and time the (batch, seq) grid. Runs inside the worker subprocess."""
    from .runtime import Embedder

    if cfg.threads and cand.backend == "torch":
        import torch

        torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    emb = Embedder.from_artifact(root, backend=cand.backend, variant=None if cand.backend == "torch" else cand.variant,
                                 intra_op_threads=cfg.threads if cand.backend == "onnxruntime" else None)
    load_s = time.perf_counter() - t0
    rss_loaded = _peak_rss_mb()
    cells = []
    for seq in cfg.seq_lens:
        for batch in cfg.batch_sizes:
            ids, mask = _synthetic(emb.tokenizer, batch, seq, seed=batch * 1000 + seq)
            for _ in range(cfg.warmup):
                emb.runner.infer(ids, mask)
            lat: list[float] = []
            start = time.perf_counter()
            while len(lat) < cfg.max_iters and (len(lat) < cfg.min_iters or time.perf_counter() - start < cfg.cell_seconds):
                s = time.perf_counter()
                emb.runner.infer(ids, mask)
                lat.append(time.perf_counter() - s)
            mean = statistics.fmean(lat)
            cells.append({"batch": batch, "seq": seq, "iters": len(lat), "tokens_per_s": batch * seq / mean,
                          "p50_ms": 1000 * _pct(lat, 50), "p99_ms": 1000 * _pct(lat, 99)})
            print(f"PROGRESS {cand.label} b={batch} s={seq}: {batch * seq / mean:.0f} tok/s", file=sys.stderr, flush=True)
    info = {k: v for k, v in emb.info.items() if k in ("backend", "variant", "dtype", "why")}
    info["runner"] = emb.runner.describe()
    emb.close()
    return {"candidate": cand.label, "backend": cand.backend, "variant": cand.variant, "load_s": load_s,
            "rss_after_load_mb": rss_loaded, "peak_rss_mb": _peak_rss_mb(), "model_bytes": model_bytes(root, cand),
            "info": info, "cells": cells}


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def _worker_entry(argv: list[str]) -> None:
    job = json.loads(argv[0])
    cfg = BenchConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in job["config"].items()})
    try:
        res = run_candidate(Path(job["root"]), Candidate(**job["candidate"]), cfg)
    except SfrExportError as exc:
        res = {"candidate": Candidate(**job["candidate"]).label, "error": f"{type(exc).__name__}: {exc}"}
    print(RESULT_PREFIX + json.dumps(res), flush=True)


# ---- the driver ------------------------------------------------------------------------------------------------
@dataclass
class BenchReport:
    root: str
    model: str
    config: dict[str, Any]
    machine: dict[str, Any]
    results: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_bench(root: Path, cfg: BenchConfig, *, on_progress: Any = None) -> BenchReport:
    root = Path(root)
    cands = [Candidate.parse(c) for c in cfg.candidates] if cfg.candidates else find_candidates(root)
    if not cands:
        raise ArtifactError(f"{root} holds nothing to benchmark")
    machine = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
               "load_avg_at_start": os.getloadavg()}
    report = BenchReport(str(root), str(Manifest.load(root).model.get("id")), asdict(cfg), machine)
    for cand in cands:
        if on_progress:
            on_progress(f"{cand.label}: starting a fresh process")
        job = json.dumps({"root": str(root), "candidate": asdict(cand), "config": asdict(cfg)})
        proc = subprocess.Popen([sys.executable, "-m", "sfr_export.bench", job], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        result: dict[str, Any] | None = None
        try:
            out, err = proc.communicate(timeout=cfg.timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            result = {"candidate": cand.label, "error": f"timed out after {cfg.timeout_s:.0f}s"}
        for line in out.splitlines():
            if line.startswith(RESULT_PREFIX):
                result = json.loads(line[len(RESULT_PREFIX):])
        if result is None:
            tail = " | ".join(err.strip().splitlines()[-3:])
            result = {"candidate": cand.label, "error": f"worker exited with {proc.returncode}: {tail[:400]}"}
        if "error" in result:
            log.warning("bench %s failed: %s", cand.label, result["error"])
        report.results.append(result)
        if on_progress:
            on_progress(f"{cand.label}: done")
    _add_ratios(report)
    machine["load_avg_at_end"] = os.getloadavg()
    return report


def _add_ratios(report: BenchReport) -> None:
    base = next((r for r in report.results if r.get("candidate") == "torch fp32" and "cells" in r), None)
    if base is None:
        return
    ref = {(c["batch"], c["seq"]): c for c in base["cells"]}
    for r in report.results:
        if "cells" not in r:
            continue
        for c in r["cells"]:
            b = ref.get((c["batch"], c["seq"]))
            if b:
                c["speedup_vs_torch_fp32"] = c["tokens_per_s"] / b["tokens_per_s"]
        r["rss_vs_torch_fp32"] = r["peak_rss_mb"] / base["peak_rss_mb"]
        r["size_vs_torch_fp32"] = r["model_bytes"] / base["model_bytes"] if base["model_bytes"] else None


def markdown_table(report: BenchReport) -> str:
    lines = ["| backend | batch | seq | tokens/s | p50 ms | p99 ms | x torch fp32 | peak RSS MB | model MB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report.results:
        if "cells" not in r:
            lines.append(f"| {r['candidate']} | failed: {r.get('error', '?')[:80]} |||||||")
            continue
        for c in r["cells"]:
            sp = c.get("speedup_vs_torch_fp32")
            lines.append(f"| {r['candidate']} | {c['batch']} | {c['seq']} | {c['tokens_per_s']:,.0f} | {c['p50_ms']:.2f} | "
                         f"{c['p99_ms']:.2f} | {'' if sp is None else f'{sp:.2f}'} | {r['peak_rss_mb']:.0f} | "
                         f"{r['model_bytes'] / 2**20:.1f} |")
    return "\n".join(lines)


def write_outputs(report: BenchReport, json_path: Path, png_path: Path | None) -> None:
    atomic_write_text(json_path, json.dumps(report.to_dict(), indent=2) + "\n")
    if png_path is not None:
        plot(report, png_path)


def plot(report: BenchReport, path: Path) -> None:
    from ._optional import require

    matplotlib = require("matplotlib", purpose="the benchmark plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in report.results if "cells" in r]
    if not ok:
        raise ArtifactError("no candidate produced results to plot")
    labels = [f"b{c['batch']}/s{c['seq']}" for c in ok[0]["cells"]]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(10, len(labels) * 1.4), 4.8),
                                   gridspec_kw={"width_ratios": [3, 1]})
    width = 0.8 / len(ok)
    for i, r in enumerate(ok):
        xs = [j + i * width for j in range(len(r["cells"]))]
        ax1.bar(xs, [c["tokens_per_s"] for c in r["cells"]], width, label=r["candidate"])
    ax1.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))], labels, rotation=45, ha="right")
    ax1.set_ylabel("tokens/s (higher is better)")
    ax1.set_yscale("log")
    ax1.set_title(f"{report.model}: throughput by batch/sequence (ratios matter, not absolutes)")
    ax1.legend(fontsize=8)
    ax2.bar([r["candidate"] for r in ok], [r["peak_rss_mb"] for r in ok], color="gray")
    ax2.set_ylabel("peak RSS MB (own process)")
    ax2.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


if __name__ == "__main__":
    _worker_entry(sys.argv[1:])
