"""Side-by-side comparison: the reference and every candidate backend embed identical token ids, then each task
is scored for both and the embeddings are compared row by row.

Order of work (memory-friendly for 7B models: one backend loaded at a time):
1. load the suite, tokenize every task once (unique (side, text) inputs, prompts applied per side);
2. reference pass, task by task, through the reference cache; a time budget drops the tasks not reached;
3. for each candidate: open it (or record it as skipped, with the reason), embed the same ids, score, compare, close.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ArtifactError, BackendUnavailableError, EngineError, MissingDependencyError, UserInputError
from ..manifest import Manifest
from ..runtime.embedder import Embedder, load_spec, onnx_variants
from ..spec import ModelSpec
from ..tokenization import TextTokenizer
from .cache import ReferenceCache, ids_key, model_key
from .evaluate import prepare, score
from .gate import precision_of
from .result import TaskScore
from .retrieval import top_k_overlap
from .suite import Suite, TaskEntry
from .tasks import Task

log = logging.getLogger(__name__)

VARIANT_ORDER = ("fp32", "fp16", "int8", "int8-cpu")


@dataclass
class TaskInputs:
    """One task's unique inputs, tokenized once for every backend."""

    entry: TaskEntry
    task: Task
    ids: list[list[int]]
    meta: list[tuple[str, str]]  # (side, raw text) of each unique input
    index: dict[str, np.ndarray]  # group key -> rows of the unique inputs
    truncated: int = 0

    def groups(self, uniq: np.ndarray) -> dict[str, np.ndarray]:
        return {k: uniq[ix] for k, ix in self.index.items()}


def tokenize_task(tok: TextTokenizer, spec: ModelSpec, entry: TaskEntry, task: Task) -> TaskInputs:
    uniq: dict[tuple[str, str], int] = {}
    index: dict[str, np.ndarray] = {}
    for g in task.groups():
        rows = [uniq.setdefault((g.side, t), len(uniq)) for t in g.texts]
        index[g.key] = np.asarray(rows, dtype=np.int64)
    meta = list(uniq)
    ids: list[list[int]] = [[] for _ in meta]
    truncated = 0
    for side in ("query", "document"):
        rows = [i for i, (s, _) in enumerate(meta) if s == side]
        if not rows:
            continue
        texts = [meta[i][1] for i in rows]
        instruction = entry.instruction if side == "query" else None
        formatted = spec.apply_prompt(texts, entry.prompt, instruction=instruction, side=side)
        enc = tok.encode(formatted)
        truncated += enc.truncated
        for i, seq in zip(rows, enc.ids):
            ids[i] = seq
    return TaskInputs(entry, task, ids, meta, index, truncated)


@dataclass(frozen=True)
class BackendChoice:
    name: str  # what the user asked for: torch, fp32, fp16, int8, tensorrt, ...
    backend: str  # torch | onnxruntime | tensorrt
    variant: str | None
    precision: str

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "backend": self.backend, "variant": self.variant, "precision": self.precision}


def _engine_precision(manifest: Manifest) -> str:
    rec = manifest.stage("engine")
    return precision_of(str(rec.config.get("precision", "fp16"))) if rec else "fp16"


def resolve_backend(manifest: Manifest, name: str) -> BackendChoice | str:
    """The backend for ``name``, or the reason it cannot run here (a string)."""
    variants = onnx_variants(manifest)
    if name == "torch":
        local = manifest.model.get("local_dir")
        if not local or not Path(local).is_dir():
            return f"the torch model dir {local} is gone"
        return BackendChoice("torch", "torch", None, precision_of(str(manifest.data.get("reference_dtype", "fp32"))))
    if name == "tensorrt":
        from .._optional import available

        rec = manifest.stage("engine")
        if rec is None:
            return "no TensorRT engine in the artifact (run `sfr-export engine` on a GPU machine)"
        if rec.status != "ok":
            return f"the engine stage was {rec.status}: {rec.reason or 'no reason recorded'}"
        if not (available("tensorrt") or available("tensorrt_lean")):
            return "TensorRT is not installed (pip install 'sfr-export[gpu]')"
        return BackendChoice("tensorrt", "tensorrt", None, _engine_precision(manifest))
    if name in variants:
        rec = manifest.stage(variants[name])
        prec = str(rec.config.get("precision", name)) if rec else name
        return BackendChoice(name, "onnxruntime", name, precision_of(prec))
    have = ", ".join(sorted(variants)) or "none"
    return f"no '{name}' ONNX variant in the artifact (have: {have})"


def default_candidates(manifest: Manifest) -> list[str]:
    variants = onnx_variants(manifest)
    names = [v for v in VARIANT_ORDER if v in variants] + sorted(v for v in variants if v not in VARIANT_ORDER)
    if manifest.stage("engine") is not None:  # reported as skipped (with the reason) when it cannot run here
        names.append("tensorrt")
    return names


def expand_candidates(manifest: Manifest, requested: tuple[str, ...] | None) -> list[str]:
    if requested is None:
        return default_candidates(manifest)
    out: list[str] = []
    for name in requested:
        for n in (default_candidates(manifest) if name in ("all", "onnx") else [name]):
            if n == "tensorrt" and name == "onnx":
                continue
            if n not in out:
                out.append(n)
    if not out:
        raise UserInputError("no candidates to verify: the artifact has no ONNX variant or engine")
    return out


def open_backend(root: Path, choice: BackendChoice, *, batch_size: int, max_batch_tokens: int | None) -> Embedder:
    return Embedder.from_artifact(root, backend=choice.backend, variant=choice.variant, batch_size=batch_size,
                                  max_batch_tokens=max_batch_tokens)


def cosine_rows(ref: np.ndarray, cand: np.ndarray) -> np.ndarray:
    r = ref.astype(np.float64)
    c = cand.astype(np.float64)
    return (r * c).sum(1) / np.maximum(np.linalg.norm(r, axis=1) * np.linalg.norm(c, axis=1), 1e-12)


def cosine_stats(cos: np.ndarray) -> dict[str, float]:
    return {"n": int(cos.size), "mean": float(cos.mean()), "p1": float(np.percentile(cos, 1)), "min": float(cos.min())}


@dataclass
class CompareSettings:
    reference: str = "torch"
    candidates: tuple[str, ...] | None = None
    batch_size: int = 32
    max_batch_tokens: int | None = 8192
    time_budget_s: float | None = None
    worst_k: int = 5


@dataclass
class Comparison:
    """Everything the reports need (``report.build_report`` turns it into the versioned JSON)."""

    suite: Suite
    data_dir: Path
    tasks: list[TaskInputs]
    dropped: list[tuple[str, str]]  # (task, reason) left out, e.g. by the time budget
    reference: dict[str, Any]
    reference_scores: dict[str, TaskScore]
    candidates: list[dict[str, Any]] = field(default_factory=list)
    timing: dict[str, float] = field(default_factory=dict)


def _embed(emb: Embedder, ti: TaskInputs, settings: CompareSettings) -> np.ndarray:
    return emb.encode_ids(ti.ids, batch_size=settings.batch_size, max_batch_tokens=settings.max_batch_tokens, check=False)


def compare(root: Path, suite: Suite, settings: CompareSettings, *, data_dir: Path | None = None,
            cache: ReferenceCache | None = None,
            on_progress: Callable[[str], None] | None = None) -> Comparison:
    say = on_progress or (lambda _msg: None)
    t_start = time.perf_counter()
    root = Path(root)
    manifest = Manifest.load(root)
    spec = load_spec(root)
    cache = cache or ReferenceCache(enabled=False)
    names = expand_candidates(manifest, settings.candidates)
    ref_choice = resolve_backend(manifest, settings.reference)
    if isinstance(ref_choice, str):
        raise BackendUnavailableError(f"reference '{settings.reference}' cannot run: {ref_choice}")

    say("loading suite data")
    ddir = suite.data_dir(data_dir)
    loaded = suite.load(data_dir)
    t0 = time.perf_counter()
    tok = TextTokenizer.from_dir(root / "tokenizer", spec)
    tasks = [tokenize_task(tok, spec, e, prepare(t)) for e, t in loaded]
    t_tok = time.perf_counter() - t0

    # ---- reference pass ----
    mkey = model_key(str(manifest.model.get("fingerprint")), spec.to_dict(), ref_choice.describe())
    share = None
    if settings.time_budget_s is not None:  # the reference's share: it and each runnable candidate cost about alike
        runnable = sum(not isinstance(resolve_backend(manifest, n), str) for n in names)
        share = settings.time_budget_s / (1 + runnable)
    ref_emb: list[np.ndarray] = []
    dropped: list[tuple[str, str]] = []
    reference: Embedder | None = None
    t0 = time.perf_counter()
    kept: list[TaskInputs] = []
    try:
        for ti in tasks:
            if share is not None and kept and time.perf_counter() - t0 > share:
                dropped.append((ti.entry.name, f"time budget: the reference used its {share:.0f} s share"))
                continue
            key = ids_key(mkey, ti.ids)
            arr = cache.get(key, len(ti.ids))
            if arr is None:
                if reference is None:
                    say(f"opening reference {ref_choice.name}")
                    reference = open_backend(root, ref_choice, batch_size=settings.batch_size,
                                             max_batch_tokens=settings.max_batch_tokens)
                say(f"reference: {ti.entry.name} ({len(ti.ids)} inputs)")
                arr = _embed(reference, ti, settings)
                cache.put(key, arr)
            ref_emb.append(arr)
            kept.append(ti)
    finally:
        if reference is not None:
            reference.close()
    t_ref = time.perf_counter() - t0
    ref_scores = {ti.entry.name: score(ti.task, ti.groups(e), clustering=ti.entry.clustering)
                  for ti, e in zip(kept, ref_emb)}
    ref_info = {**ref_choice.describe(), "seconds": t_ref, "cache": cache.describe(),
                "inputs": int(sum(len(ti.ids) for ti in kept)), "anisotropy": anisotropy(ref_emb)}
    result = Comparison(suite=suite, data_dir=ddir, tasks=kept, dropped=dropped, reference=ref_info,
                        reference_scores=ref_scores)

    # ---- candidates ----
    for name in names:
        result.candidates.append(_run_candidate(root, manifest, name, kept, ref_emb, ref_scores, settings, say))
    result.timing = {"tokenize_seconds": t_tok, "reference_seconds": t_ref,
                     "total_seconds": time.perf_counter() - t_start}
    return result


def _run_candidate(root: Path, manifest: Manifest, name: str, tasks: list[TaskInputs], ref_emb: list[np.ndarray],
                   ref_scores: dict[str, TaskScore], settings: CompareSettings,
                   say: Callable[[str], None]) -> dict[str, Any]:
    choice = resolve_backend(manifest, name)
    if isinstance(choice, str):
        log.warning("candidate %s skipped: %s", name, choice)
        return {"name": name, "status": "skipped", "reason": choice, "precision": precision_of(name)}
    t0 = time.perf_counter()
    try:
        emb = open_backend(root, choice, batch_size=settings.batch_size, max_batch_tokens=settings.max_batch_tokens)
    except (BackendUnavailableError, MissingDependencyError, EngineError) as exc:
        log.warning("candidate %s skipped: %s", name, exc)
        return {**choice.describe(), "status": "skipped", "reason": str(exc)}
    except ArtifactError:
        raise  # a corrupt or mismatched artifact is an error, never a skip
    info = dict(emb.info)
    all_cos: list[np.ndarray] = []
    worst: list[tuple[float, str, str, str]] = []
    task_rows: list[dict[str, Any]] = []
    task_cos: dict[str, dict[str, float]] = {}
    try:
        for ti, ref in zip(tasks, ref_emb):
            say(f"{name}: {ti.entry.name} ({len(ti.ids)} inputs)")
            cand = _embed(emb, ti, settings)
            cos = cosine_rows(ref, cand)
            all_cos.append(cos)
            task_cos[ti.entry.name] = cosine_stats(cos)
            for i in np.argsort(cos)[: settings.worst_k]:
                side, text = ti.meta[i]
                worst.append((float(cos[i]), ti.entry.name, side, text))
            cs = score(ti.task, ti.groups(cand), clustering=ti.entry.clustering)
            rs = ref_scores[ti.entry.name]
            row: dict[str, Any] = {"task": ti.entry.name, "type": ti.task.type, "main_metric": rs.main_metric,
                                   "reference": rs.main, "candidate": cs.main, "delta": cs.main - rs.main,
                                   "metrics": {"reference": rs.metrics, "candidate": cs.metrics},
                                   "cosine": task_cos[ti.entry.name]}
            if rs.rankings is not None and cs.rankings is not None:
                row["top10_overlap"] = top_k_overlap(rs.rankings, cs.rankings)
            task_rows.append(row)
    finally:
        emb.close()
    cos = np.concatenate(all_cos) if all_cos else np.ones(1)
    worst.sort(key=lambda w: w[0])
    return {**choice.describe(), "status": "evaluated", "reason": "", "runner": info,
            "seconds": time.perf_counter() - t0,
            "cosine": {**cosine_stats(cos), "histogram": histogram(cos),
                       "worst": [{"cosine": c, "task": t, "side": s, "text": x[:300]}
                                 for c, t, s, x in worst[: settings.worst_k]]},
            "task_cosine": task_cos, "tasks": task_rows}


def anisotropy(embs: list[np.ndarray], pairs: int = 4000, seed: int = 0) -> float | None:
    """Mean cosine between the reference embeddings of random *different* inputs: the baseline that says how
    much a cosine-to-reference figure means (decoder embedders are anisotropic: unrelated texts often sit at 0.5+)."""
    x = np.concatenate(embs).astype(np.float64) if embs else np.zeros((0, 1))
    if len(x) < 2:
        return None
    rng = np.random.default_rng(seed)
    i = rng.integers(0, len(x), pairs)
    j = (i + rng.integers(1, len(x), pairs)) % len(x)
    return float(cosine_rows(x[i], x[j]).mean())


def histogram(cos: np.ndarray, bins: int = 20) -> dict[str, list[float]]:
    lo = float(min(cos.min(), 0.999999))
    counts, edges = np.histogram(cos, bins=bins, range=(lo, 1.0 + 1e-9))
    return {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]}
