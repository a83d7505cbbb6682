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
from ..artifact import Artifact, Backend, Candidate, Precision, Variant
from ..artifact.layout import TOKENIZER_DIR
from ..runtime.embedder import Embedder
from ..vectors import row_cosine
from ..spec import ModelSpec
from ..tokenization import TextTokenizer
from .cache import ReferenceCache, ids_key, model_key
from .evaluate import prepare, score
from .result import TaskScore
from .retrieval import top_k_overlap
from .suite import Suite, TaskEntry
from .tasks import Task

log = logging.getLogger(__name__)



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


SPECIAL_NAMES = ("all", "onnx", Backend.TORCH.value, Backend.TENSORRT.value)


def describe(cand: Candidate) -> dict[str, Any]:
    return {"name": cand.name, "backend": cand.backend.value, "variant": cand.variant.value if cand.variant else None,
            "precision": cand.precision.value}


def default_candidates(art: Artifact) -> list[str]:
    """Every ONNX variant, then TensorRT when an engine is recorded (reported as skipped, with the reason, when it
    cannot run here)."""
    names = [v.value for v in art.variants()]
    return names + ([Backend.TENSORRT.value] if art.engine() is not None else [])


def expand_candidates(art: Artifact, requested: tuple[str, ...] | None) -> list[str]:
    """The candidate names to compare; a name this artifact does not hold is refused before any work (TensorRT,
    which needs the machine as well, is reported as skipped with the reason)."""
    if requested is None:
        return default_candidates(art)
    known = [*(v.value for v in Variant), *SPECIAL_NAMES]
    have = [v.value for v in art.variants()]
    out: list[str] = []
    for name in requested:
        if name not in known:
            raise UserInputError(f"--candidates: unknown candidate '{name}' (expected some of: {', '.join(known)})")
        if name not in SPECIAL_NAMES and name not in have:  # asked for by name: an argument error, before any work
            raise UserInputError(f"--candidates: no '{name}' ONNX variant in {art.root} (have: {', '.join(have)})")
        expanded = default_candidates(art) if name in ("all", "onnx") else [name]
        out += [n for n in expanded if n not in out and not (n == Backend.TENSORRT.value and name == "onnx")]
    if not out:
        raise UserInputError("no candidates to verify: the artifact has no ONNX variant or engine")
    return out


def check_settings(art: Artifact, settings: CompareSettings) -> tuple[list[str], Candidate]:
    """The candidates' names and the reference, or the error naming the argument (made before any work)."""
    names = expand_candidates(art, settings.candidates)
    ref_choice = art.resolve(settings.reference)
    if isinstance(ref_choice, str):
        raise BackendUnavailableError(f"reference '{settings.reference}' cannot run: {ref_choice}")
    return names, ref_choice


def open_backend(root: Path, cand: Candidate, *, batch_size: int, max_batch_tokens: int | None) -> Embedder:
    return Embedder.from_artifact(root, backend=cand.backend, variant=cand.variant, batch_size=batch_size,
                                  max_batch_tokens=max_batch_tokens)


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
    art = Artifact.open(root)
    spec = art.spec()
    cache = cache or ReferenceCache(enabled=False)
    names, ref_choice = check_settings(art, settings)
    say("loading suite data")
    ddir = suite.data_dir(data_dir)
    loaded = suite.load(data_dir)
    t0 = time.perf_counter()
    tok = TextTokenizer.from_dir(art.root / TOKENIZER_DIR, spec)
    tasks = [tokenize_task(tok, spec, e, prepare(t)) for e, t in loaded]
    t_tok = time.perf_counter() - t0
    share = None
    if settings.time_budget_s is not None:  # the reference's share: it and each runnable candidate cost about alike
        share = settings.time_budget_s / (1 + sum(not isinstance(art.resolve(n), str) for n in names))
    t0 = time.perf_counter()
    kept, ref_emb, dropped = _reference_pass(art, ref_choice, tasks, settings, cache, share, say)
    t_ref = time.perf_counter() - t0
    ref_scores = {ti.entry.name: score(ti.task, ti.groups(e), clustering=ti.entry.clustering)
                  for ti, e in zip(kept, ref_emb)}
    ref_info = {**describe(ref_choice), "seconds": t_ref, "cache": cache.describe(),
                "inputs": int(sum(len(ti.ids) for ti in kept)), "anisotropy": anisotropy(ref_emb)}
    result = Comparison(suite=suite, data_dir=ddir, tasks=kept, dropped=dropped, reference=ref_info,
                        reference_scores=ref_scores)
    for name in names:
        result.candidates.append(_run_candidate(art, name, kept, ref_emb, ref_scores, settings, say))
    result.timing = {"tokenize_seconds": t_tok, "reference_seconds": t_ref,
                     "total_seconds": time.perf_counter() - t_start}
    return result


def _reference_pass(art: Artifact, ref_choice: Candidate, tasks: list[TaskInputs], settings: CompareSettings,
                    cache: ReferenceCache, share: float | None, say: Callable[[str], None],
                    ) -> tuple[list[TaskInputs], list[np.ndarray], list[tuple[str, str]]]:
    """The reference's embeddings of each task (from the cache when it has them); tasks past the time share drop."""
    mkey = model_key(str(art.manifest.model.get("fingerprint")), art.spec().to_dict(), describe(ref_choice))
    kept: list[TaskInputs] = []
    ref_emb: list[np.ndarray] = []
    dropped: list[tuple[str, str]] = []
    reference: Embedder | None = None
    t0 = time.perf_counter()
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
                    reference = open_backend(art.root, ref_choice, batch_size=settings.batch_size,
                                             max_batch_tokens=settings.max_batch_tokens)
                say(f"reference: {ti.entry.name} ({len(ti.ids)} inputs)")
                arr = _embed(reference, ti, settings)
                cache.put(key, arr)
            ref_emb.append(arr)
            kept.append(ti)
    finally:
        if reference is not None:
            reference.close()
    return kept, ref_emb, dropped


def _run_candidate(art: Artifact, name: str, tasks: list[TaskInputs], ref_emb: list[np.ndarray],
                   ref_scores: dict[str, TaskScore], settings: CompareSettings,
                   say: Callable[[str], None]) -> dict[str, Any]:
    choice = art.resolve(name)
    if isinstance(choice, str):  # the stage that would provide it said so already (e.g. "engine stage skipped")
        log.debug("candidate %s skipped: %s", name, choice)  # the report's table shows it
        prec = art.engine_precision() if name == Backend.TENSORRT.value else Precision.FP32
        return {"name": name, "status": "skipped", "reason": choice, "precision": prec.value}
    t0 = time.perf_counter()
    try:
        emb = open_backend(art.root, choice, batch_size=settings.batch_size, max_batch_tokens=settings.max_batch_tokens)
    except (BackendUnavailableError, MissingDependencyError, EngineError) as exc:
        log.warning("candidate %s skipped: %s", name, exc)
        return {**describe(choice), "status": "skipped", "reason": str(exc)}
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
            cos = row_cosine(ref, cand)
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
    return {**describe(choice), "status": "evaluated", "reason": "", "runner": info,
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
    return float(row_cosine(x[i], x[j]).mean())


def histogram(cos: np.ndarray, bins: int = 20) -> dict[str, list[float]]:
    lo = float(min(cos.min(), 0.999999))
    counts, edges = np.histogram(cos, bins=bins, range=(lo, 1.0 + 1e-9))
    return {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]}
