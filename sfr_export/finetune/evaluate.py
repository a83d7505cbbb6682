"""STS Spearman and retrieval nDCG@10 of any ``Embedder``, through the shared evaluators of ``sfr_export.eval``.

Thin adapters for the fine-tuning proof: they embed plain lists with the task's prompts (STS: both sentences with
the instruction; retrieval: queries with it, documents plain) and hand the embeddings to ``sfr_export.eval``'s
``evaluate_sts`` / ``evaluate_retrieval`` (MTEB's protocol). Scores are returned as fractions (0-1), not points.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..errors import UserInputError


def load_sts_csv(path: Path) -> tuple[list[str], list[str], list[float]]:
    s1, s2, gold = [], [], []
    with open(path, encoding="utf-8", newline="") as fh:
        for row in csv.reader(fh):
            s1.append(row[0])
            s2.append(row[1])
            gold.append(float(row[2]))
    return s1, s2, gold


def sts_spearman(embedder, s1: Sequence[str], s2: Sequence[str], gold: Sequence[float], *, task: str) -> float:
    from ..eval.sts import evaluate_sts
    from ..eval.tasks import StsTask

    if not (len(s1) == len(s2) == len(gold)) or len(gold) < 2:
        raise UserInputError("STS evaluation needs >= 2 pairs with one gold score each")
    t = StsTask(name=task, sentences1=tuple(s1), sentences2=tuple(s2), scores=tuple(gold))
    emb = {"sentences1": embedder.encode(list(s1), prompt=task), "sentences2": embedder.encode(list(s2), prompt=task)}
    return evaluate_sts(t, emb).main / 100.0


def retrieval_ndcg(embedder, corpus: Mapping[str, str], queries: Mapping[str, str],
                   qrels: Mapping[str, Mapping[str, int]], *, task: str) -> float:
    """nDCG@10 over the queries that have judgements."""
    from ..eval.retrieval import evaluate_retrieval
    from ..eval.tasks import RetrievalTask

    doc_ids = tuple(d for d, t in corpus.items() if t)
    q_ids = tuple(q for q in queries if q in qrels)
    if not q_ids or not doc_ids:
        raise UserInputError("retrieval evaluation needs documents and at least one judged query")
    t = RetrievalTask(name=task, corpus_ids=doc_ids, corpus_texts=tuple(corpus[d] for d in doc_ids), query_ids=q_ids,
                      query_texts=tuple(queries[q] for q in q_ids), qrels={q: dict(qrels[q]) for q in q_ids})
    emb = {"queries": embedder.encode_queries(list(t.query_texts), task=task),
           "corpus": embedder.encode_documents(list(t.corpus_texts), task=task)}
    return evaluate_retrieval(t, emb).main / 100.0
