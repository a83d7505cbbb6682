"""Teacher hard-negative mining (``sfr-export mine``).

Any ``Embedder`` is a teacher: the base model (torch), another model, or an exported artifact (ONNX / TensorRT).
Per task, the teacher embeds the corpus (the task's positives and negatives plus an optional corpus file) and each
query; negatives are sampled from the teacher's ranks ``[start, end)`` of the candidates that remain after removing

- every positive of the query (its own, and those of other examples with the same query text) and the query itself;
- likely false negatives: candidates scoring above ``false_negative_ratio`` x the positive's score.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import TrainingError
from .config import MiningConfig
from .data import Example, document_instruction, tasks_of

log = logging.getLogger(__name__)


@dataclass
class MiningReport:
    mined: dict[str, int] = field(default_factory=dict)  # task -> examples that got negatives
    short: dict[str, int] = field(default_factory=dict)  # task -> examples with fewer than asked
    dropped_false_negatives: int = 0
    corpus_sizes: dict[str, int] = field(default_factory=dict)


def load_teacher(teacher: str, *, backend: str = "auto", max_length: int | None = None, batch_size: int = 32):
    """An Embedder for ``teacher``: an sfr-export artifact dir (has manifest.json) or any model reference."""
    from ..artifact.layout import MANIFEST_FILE as MANIFEST_NAME
    from ..runtime.embedder import Embedder, embedder_for_model
    from ..tokenization import TextTokenizer

    if not teacher:
        raise TrainingError("no teacher given")
    if (Path(teacher).expanduser() / MANIFEST_NAME).is_file():
        emb = Embedder.from_artifact(Path(teacher).expanduser(), backend=backend, batch_size=batch_size)
    else:
        from ..models.loading import resolve_model

        resolved = resolve_model(teacher, compute_fingerprint=False)
        emb = embedder_for_model(resolved.local_dir, resolved.spec, batch_size=batch_size)
    if max_length is not None and max_length < emb.spec.max_length:
        spec = emb.spec.replace(max_length=max_length)
        emb.tokenizer = TextTokenizer(emb.tokenizer.tok, spec)
        emb.spec = spec
    return emb


def _encode(teacher, texts: list[str], instruction: str | None) -> np.ndarray:
    vecs = teacher.encode(texts, instruction=instruction) if instruction else teacher.encode(texts)
    norms = np.linalg.norm(vecs, axis=1, keepdims=True)
    return vecs / np.maximum(norms, 1e-12)


def mine_hard_negatives(examples: Sequence[Example], teacher, config: MiningConfig, *,
                        corpora: Mapping[str, Sequence[str]] | None = None) -> tuple[list[Example], MiningReport]:
    """Return ``examples`` with mined negatives for the tasks whose type is in ``config.types``."""
    lo, hi = config.rank_window
    report = MiningReport()
    out = list(examples)
    corpora = dict(corpora or {})
    unknown = sorted(set(corpora) - {ex.task for ex in examples})
    if unknown:
        raise TrainingError(f"corpus given for task(s) not in the data: {', '.join(unknown)}")
    for task, idx in tasks_of(examples).items():
        first = examples[idx[0]]
        if first.type not in config.types:
            continue
        # corpus: extra corpus first, then positives and existing negatives; deduplicated, order kept
        corpus = list(dict.fromkeys([*corpora.get(task, ()), *(examples[i].positive for i in idx),
                                     *(n for i in idx for n in examples[i].negatives)]))
        report.corpus_sizes[task] = len(corpus)
        pos_of: dict[str, set[str]] = {}
        for i in idx:
            pos_of.setdefault(examples[i].query, set()).add(examples[i].positive)
        queries = list(dict.fromkeys(examples[i].query for i in idx))
        log.info("mining %s: %d queries against %d documents", task, len(queries), len(corpus))
        q_emb = _encode(teacher, queries, first.instruction or None)
        d_emb = _encode(teacher, corpus, document_instruction(first))
        col = {t: j for j, t in enumerate(corpus)}
        q_row = {q: j for j, q in enumerate(queries)}
        ranked: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for q in queries:
            scores = d_emb @ q_emb[q_row[q]]
            order = np.argsort(-scores, kind="stable")
            banned = {col[p] for p in pos_of[q] if p in col} | ({col[q]} if q in col else set())
            order = np.array([j for j in order if j not in banned], dtype=np.int64)
            ranked[q] = (order, scores)
        mined = short = 0
        for i in idx:
            ex = examples[i]
            order, scores = ranked[ex.query]
            window = order[lo:hi]
            pos_score = float(scores[col[ex.positive]])
            keep = [int(j) for j in window if scores[j] <= config.false_negative_ratio * pos_score]
            report.dropped_false_negatives += len(window) - len(keep)
            rng = random.Random(f"{config.seed}:{task}:{i}")
            chosen = rng.sample(keep, min(config.negatives, len(keep)))
            negs = [corpus[j] for j in chosen]
            assert not set(negs) & pos_of[ex.query], "a positive was mined as a negative"
            out[i] = ex.with_negatives(negs)
            mined += 1
            short += len(negs) < config.negatives
        report.mined[task] = mined
        if short:
            report.short[task] = short
            log.warning("%s: %d of %d examples got fewer than %d negatives (corpus %d, window %s)",
                        task, short, len(idx), config.negatives, len(corpus), config.rank_window)
    return out, report
