"""STS evaluator: Spearman correlation of cosine similarity against the gold scores.

Follows mteb 2.x ``mteb/_evaluators/any_sts_evaluator.py`` (``AnySTSEvaluator.__call__``: cosine scores are
``1 - paired_cosine_distances(e1, e2)``) and ``mteb/abstasks/sts.py`` (``AbsTaskSTS._calculate_scores``: scipy
``spearmanr``/``pearsonr`` against the gold scores normalised by ``(score - min_score) / (max_score - min_score)``).
The main score is ``cosine_spearman`` (the ``main_score`` of STSBenchmark, STS13-16 and BIOSSES), reported in points.
"""

from __future__ import annotations

import numpy as np

from .result import TaskScore
from .tasks import StsTask


def paired_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity (float64), as sklearn's ``1 - paired_cosine_distances``."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    na = np.linalg.norm(a, axis=1)
    nb = np.linalg.norm(b, axis=1)
    return (a * b).sum(axis=1) / np.maximum(na * nb, 1e-12)


def evaluate_sts(task: StsTask, emb: dict[str, np.ndarray]) -> TaskScore:
    from scipy.stats import pearsonr, spearmanr

    gold = (np.asarray(task.scores, dtype=np.float64) - task.min_score) / (task.max_score - task.min_score)
    cos = paired_cosine(emb["sentences1"], emb["sentences2"])
    spearman = float(spearmanr(gold, cos)[0])
    pearson = float(pearsonr(gold, cos)[0])
    return TaskScore(task=task.name, type=task.type, main_metric="cosine_spearman", main=100.0 * spearman,
                     metrics={"cosine_spearman": 100.0 * spearman, "cosine_pearson": 100.0 * pearson})
