"""Retrieval evaluator: exact dense search by cosine, nDCG@10 (main), recall@100 and MRR@10.

Follows mteb 2.x: ``mteb/abstasks/retrieval.py`` (``k_values = (1, 3, 5, 10, 20, 100, 1000)``; the search keeps
the top ``max(k_values)`` documents per query by the model's similarity, cosine for these models) and
``mteb/_evaluators/retrieval_metrics.py`` (``calculate_retrieval_scores``: ``ndcg_cut``, ``recall`` via
``pytrec_eval``; ``mrr`` computed in Python with ties broken by document id descending "to match pytrec_eval").
pytrec_eval is trec_eval, reimplemented here in numpy with trec_eval's semantics: ranking by score descending, ties
by document id descending; nDCG gain = the graded relevance, discount ``log2(rank + 1)``, ideal DCG from the judged
grades; recall@k = relevant retrieved in the top k / all relevant (grade > 0). Scores are means over queries, in
points. Documents are ``(title + " " + text).strip()`` and only queries get the task instruction.
"""

from __future__ import annotations

import numpy as np

from .result import TaskScore
from .tasks import RetrievalTask

TOP_K = 1000
OVERLAP_K = 10


def rank(query_emb: np.ndarray, corpus_emb: np.ndarray, corpus_ids: tuple[str, ...],
         top_k: int = TOP_K) -> list[list[tuple[str, float]]]:
    """Per query, the top ``top_k`` (doc id, cosine) pairs, sorted by score then doc id, both descending."""
    q = np.asarray(query_emb, dtype=np.float32)
    d = np.asarray(corpus_emb, dtype=np.float32)
    q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    d = d / np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-12)
    sims = q @ d.T
    out: list[list[tuple[str, float]]] = []
    k = min(top_k, d.shape[0])
    for row in sims:
        cand = np.argpartition(-row, k - 1)[:k] if k < len(row) else np.arange(len(row))
        pairs = [(corpus_ids[i], float(row[i])) for i in cand]
        pairs.sort(key=lambda p: (p[1], p[0]), reverse=True)
        out.append(pairs)
    return out


def ndcg_at(ranked: list[str], judged: dict[str, int], k: int) -> float:
    gains = [max(judged.get(d, 0), 0) for d in ranked[:k]]
    dcg = sum(g / np.log2(i + 2) for i, g in enumerate(gains))
    ideal = sorted((g for g in judged.values() if g > 0), reverse=True)[:k]
    idcg = sum(g / np.log2(i + 2) for i, g in enumerate(ideal))
    return float(dcg / idcg) if idcg > 0 else 0.0


def recall_at(ranked: list[str], judged: dict[str, int], k: int) -> float:
    rel = {d for d, g in judged.items() if g > 0}
    return len(rel.intersection(ranked[:k])) / len(rel) if rel else 0.0


def mrr_at(ranked: list[str], judged: dict[str, int], k: int) -> float:
    for i, d in enumerate(ranked[:k]):
        if judged.get(d, 0) > 0:
            return 1.0 / (i + 1)
    return 0.0


def evaluate_retrieval(task: RetrievalTask, emb: dict[str, np.ndarray]) -> TaskScore:
    results = rank(emb["queries"], emb["corpus"], task.corpus_ids)
    ndcg, recall, mrr = [], [], []
    rankings: dict[str, list[str]] = {}
    for qid, hits in zip(task.query_ids, results):
        ranked = [d for d, _ in hits]
        judged = task.qrels[qid]
        ndcg.append(ndcg_at(ranked, judged, 10))
        recall.append(recall_at(ranked, judged, 100))
        mrr.append(mrr_at(ranked, judged, 10))
        rankings[qid] = ranked[:OVERLAP_K]
    main = 100.0 * float(np.mean(ndcg))
    return TaskScore(task=task.name, type=task.type, main_metric="ndcg_at_10", main=main,
                     metrics={"ndcg_at_10": main, "recall_at_100": 100.0 * float(np.mean(recall)),
                              "mrr_at_10": 100.0 * float(np.mean(mrr))},
                     rankings=rankings)


def top_k_overlap(ref: dict[str, list[str]], cand: dict[str, list[str]]) -> float:
    """Mean over queries of |top-k(reference) ∩ top-k(candidate)| / k."""
    vals = [len(set(ref[q]) & set(cand.get(q, []))) / max(len(ref[q]), 1) for q in ref]
    return float(np.mean(vals)) if vals else 0.0
