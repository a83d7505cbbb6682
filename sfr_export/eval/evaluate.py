"""Dispatch: one evaluator per MTEB task type (see each module's docstring for the mteb code it follows)."""

from __future__ import annotations

import numpy as np

from .classification import embed_only_used_rows, evaluate_classification
from .clustering import ClusteringProtocol, evaluate_clustering
from .pair_classification import evaluate_pair_classification
from .result import TaskScore
from .retrieval import evaluate_retrieval
from .sts import evaluate_sts
from .tasks import (ClassificationTask, ClusteringTask, EvalDataError, PairClassificationTask, RetrievalTask,
                    StsTask, Task)


def prepare(task: Task) -> Task:
    """The form of ``task`` that is embedded and scored (classification keeps only the training rows it uses)."""
    if isinstance(task, ClassificationTask):
        return embed_only_used_rows(task)
    return task


def score(task: Task, emb: dict[str, np.ndarray], *, clustering: ClusteringProtocol = ClusteringProtocol()) -> TaskScore:
    """Score one backend's embeddings of ``task`` (``emb`` maps each ``TextGroup.key`` to an [n, dim] array).

    BLAS runs single-threaded here: the small solves (logistic regression, mini-batch k-means) are several times
    slower with thread oversubscription on a shared CPU, and the results do not depend on it."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        return _score(task, emb, clustering)


def _score(task: Task, emb: dict[str, np.ndarray], clustering: ClusteringProtocol) -> TaskScore:
    for g in task.groups():
        if g.key not in emb or len(emb[g.key]) != len(g.texts):
            raise EvalDataError(f"task {task.name}: embeddings for group '{g.key}' are missing or of the wrong length")
    if isinstance(task, StsTask):
        return evaluate_sts(task, emb)
    if isinstance(task, ClassificationTask):
        return evaluate_classification(task, emb)
    if isinstance(task, RetrievalTask):
        return evaluate_retrieval(task, emb)
    if isinstance(task, ClusteringTask):
        return evaluate_clustering(task, emb, clustering)
    if isinstance(task, PairClassificationTask):
        return evaluate_pair_classification(task, emb)
    raise EvalDataError(f"no evaluator for task {getattr(task, 'name', task)!r} of type {getattr(task, 'type', '?')!r}")
