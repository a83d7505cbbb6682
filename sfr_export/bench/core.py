"""Side-by-side benchmark of every backend/variant an output dir holds (``sfr-export bench DIR``).

Each candidate (torch fp32, ONNX Runtime fp32/fp16/int8/int8-cpu/int8-dynamic, TensorRT) runs in a fresh
subprocess, so its peak RSS is its own; all candidates run in one invocation, one after the other, so their ratios
are comparable even on a noisy machine (absolute times are not). Inputs are synthetic token ids of exactly the
requested length (BOS/EOS per spec), fed to the runner directly: tokenization is not timed.
"""

from __future__ import annotations

import logging
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..artifact import Artifact, Backend, Candidate, Precision, Variant
from ..errors import ArtifactError, SfrExportError, UserInputError
from ..worker import peak_rss_mb, progress, run_worker

log = logging.getLogger(__name__)

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


def label(cand: Candidate) -> str:
    backend = "ort" if cand.backend is Backend.ONNXRUNTIME else cand.backend.value
    return f"{backend} {cand.variant.value if cand.variant else cand.precision.value}"


def parse_candidate(text: str, art: Artifact) -> Candidate:
    """``torch:fp32``, ``onnxruntime:int8-cpu`` or ``tensorrt:fp16``, resolved against the artifact up front."""
    backend, _, variant = text.partition(":")
    if backend not in (Backend.TORCH.value, Backend.ONNXRUNTIME.value, Backend.TENSORRT.value) or not variant:
        raise UserInputError(f"candidate {text!r} must look like torch:fp32, onnxruntime:int8 or tensorrt:fp16")
    got = art.resolve(variant if backend == Backend.ONNXRUNTIME.value else backend)
    if isinstance(got, str):
        raise UserInputError(f"candidate {text!r} cannot run: {got}")
    return got


# ---- the worker (one candidate, one fresh process) --------------------------------------------------------------
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
    from ..runtime import Embedder

    if cfg.threads and cand.backend is Backend.TORCH:
        import torch

        torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    emb = Embedder.from_artifact(root, backend=cand.backend, variant=cand.variant,
                                 intra_op_threads=cfg.threads if cand.backend is Backend.ONNXRUNTIME else None)
    load_s = time.perf_counter() - t0
    rss_loaded = peak_rss_mb()
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
            progress(f"{label(cand)} b={batch} s={seq}: {batch * seq / mean:.0f} tok/s")
    info = {k: v for k, v in emb.info.items() if k in ("backend", "variant", "dtype", "why")}
    info["runner"] = emb.runner.describe()
    emb.close()
    return {"candidate": label(cand), "backend": cand.backend.value, "variant": cand.name, "load_s": load_s,
            "rss_after_load_mb": rss_loaded, "peak_rss_mb": peak_rss_mb(),
            "model_bytes": Artifact.open(root).model_bytes(cand),
            "info": info, "cells": cells}


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def bench_job(job: dict[str, Any]) -> dict[str, Any]:
    """The worker side: one candidate in this fresh process."""
    cfg = BenchConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in job["config"].items()})
    c = job["candidate"]
    cand = Candidate(Backend(c["backend"]), Variant(c["variant"]) if c["variant"] else None, Precision(c["precision"]))
    return run_candidate(Path(job["root"]), cand, cfg)


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
    art = Artifact.open(root)
    cands = [parse_candidate(c, art) for c in cfg.candidates] if cfg.candidates else art.candidates(runnable_only=True)
    if not cands:
        raise ArtifactError(f"{root} holds nothing to benchmark")
    machine = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
               "load_avg_at_start": os.getloadavg()}
    report = BenchReport(str(root), str(art.manifest.model.get("id")), asdict(cfg), machine)
    for cand in cands:
        if on_progress:
            on_progress(f"{label(cand)}: starting a fresh process")
        report.results.append(_run_one(root, cand, cfg, on_progress))
    _add_ratios(report)
    machine["load_avg_at_end"] = os.getloadavg()
    return report


def _run_one(root: Path, cand: Candidate, cfg: BenchConfig, on_progress: Any) -> dict[str, Any]:
    job = {"root": str(root), "config": asdict(cfg),
           "candidate": {"backend": cand.backend.value, "variant": cand.variant.value if cand.variant else None,
                         "precision": cand.precision.value}}
    try:
        return run_worker("sfr_export.bench.worker", job, on_progress=on_progress, timeout=cfg.timeout_s)
    except SfrExportError as exc:
        log.warning("bench %s failed: %s", label(cand), exc)
        return {"candidate": label(cand), "error": f"{type(exc).__name__}: {exc}"}


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


