"""Small evaluators (STS Spearman, retrieval nDCG@k) over any ``Embedder``, as MTEB computes them.

Written for the fine-tuning proof and meant to be shared: they take an Embedder and plain lists, nothing else.
STS: Spearman correlation between cosine similarity and the gold score (MTEB's main STS score), both sentences
embedded with the task's instruction. Retrieval: nDCG@k with graded relevance (gain = grade, log2 discount, as
``pytrec_eval``'s ``ndcg_cut``), queries with the instruction, documents plain.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ..errors import UserInputError


def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks from 1, ties given their average rank (scipy.stats.rankdata's default)."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    sx = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sx[j + 1] == sx[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) < 2:
        raise UserInputError("spearman needs two 1-d sequences of the same length >= 2")
    ra, rb = rankdata(a), rankdata(b)
    ra -= ra.mean()
    rb -= rb.mean()
    denom = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / denom) if denom > 0 else 0.0


def load_sts_csv(path: Path) -> tuple[list[str], list[str], list[float]]:
    s1, s2, gold = [], [], []
    with open(path, encoding="utf-8", newline="") as fh:
        for row in csv.reader(fh):
            s1.append(row[0])
            s2.append(row[1])
            gold.append(float(row[2]))
    return s1, s2, gold


def sts_spearman(embedder, s1: Sequence[str], s2: Sequence[str], gold: Sequence[float], *, task: str) -> float:
    a = embedder.encode(list(s1), prompt=task)
    b = embedder.encode(list(s2), prompt=task)
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return spearman((a * b).sum(axis=1), gold)


def ndcg_at_k(scores: np.ndarray, relevance: Sequence[Mapping[int, int]], k: int = 10) -> float:
    """Mean nDCG@k. ``scores`` [queries, docs]; ``relevance[i]`` maps doc column -> grade (> 0) for query i."""
    if scores.shape[0] != len(relevance):
        raise UserInputError("one relevance mapping per query row is needed")
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    vals = []
    for row, rel in zip(scores, relevance):
        top = np.argsort(-row, kind="stable")[:k]
        dcg = sum(rel.get(int(d), 0) * discounts[r] for r, d in enumerate(top))
        ideal = sorted(rel.values(), reverse=True)[:k]
        idcg = sum(g * discounts[r] for r, g in enumerate(ideal))
        vals.append(dcg / idcg if idcg > 0 else 0.0)
    return float(np.mean(vals))


def retrieval_ndcg(embedder, corpus: Mapping[str, str], queries: Mapping[str, str],
                   qrels: Mapping[str, Mapping[str, int]], *, task: str, k: int = 10) -> float:
    doc_ids = [d for d, t in corpus.items() if t]
    col = {d: j for j, d in enumerate(doc_ids)}
    q_ids = [q for q in queries if q in qrels]
    if not q_ids:
        raise UserInputError("no query has relevance judgements")
    d_emb = embedder.encode_documents([corpus[d] for d in doc_ids], task=task)
    q_emb = embedder.encode_queries([queries[q] for q in q_ids], task=task)
    scores = q_emb @ d_emb.T
    rel = [{col[d]: g for d, g in qrels[q].items() if d in col and g > 0} for q in q_ids]
    return ndcg_at_k(scores, rel, k)
