"""Pair-classification evaluator: average precision of cosine similarity against the binary labels.

Follows mteb 2.x ``mteb/_evaluators/pair_classification_evaluator.py`` (cosine scores are
``1 - paired_cosine_distances``) and ``mteb/abstasks/pair_classification.py``
(``AbsTaskPairClassification._compute_metrics_values``: ``average_precision_score(labels, scores)`` for a
higher-is-more-similar score, plus the best-threshold accuracy and F1 of ``_find_best_acc_and_threshold`` /
``_find_best_f1_and_threshold``). The main score here is ``cosine_ap``; MTEB's ``max_ap`` is the max over
similarity functions, which for a cosine-normalised embedder is ``cosine_ap`` (dot = cosine on unit vectors).
"""

from __future__ import annotations

import numpy as np

from .result import TaskScore
from .sts import paired_cosine
from .tasks import PairClassificationTask


def best_accuracy(scores: np.ndarray, labels: np.ndarray) -> float:
    """Best accuracy over thresholds between distinct scores (mteb's ``_find_best_acc_and_threshold``)."""
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order]
    pos_so_far = np.cumsum(y == 1)[:-1]
    neg_remaining = int((labels == 0).sum()) - np.cumsum(y == 0)[:-1]
    valid = s[:-1] != s[1:]
    if not valid.any():
        return 0.0
    return float(((pos_so_far + neg_remaining) / len(labels))[valid].max())


def best_f1(scores: np.ndarray, labels: np.ndarray) -> float:
    """Best F1 over thresholds (mteb's ``_find_best_f1_and_threshold``)."""
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order]
    total = int(labels.sum())
    correct = np.cumsum(y == 1)[:-1]
    retrieved = np.arange(1, len(s))
    valid = s[:-1] != s[1:]
    if not valid.any() or total == 0:
        return 0.0
    prec = correct / retrieved
    rec = correct / total
    f1 = np.where(prec + rec > 0, 2 * prec * rec / np.maximum(prec + rec, 1e-12), 0.0)
    return float(f1[valid].max())


def evaluate_pair_classification(task: PairClassificationTask, emb: dict[str, np.ndarray]) -> TaskScore:
    from sklearn.metrics import average_precision_score

    labels = np.asarray(task.labels, dtype=np.int64)
    cos = paired_cosine(emb["sentences1"], emb["sentences2"])
    ap = 100.0 * float(average_precision_score(labels, cos))
    return TaskScore(task=task.name, type=task.type, main_metric="cosine_ap", main=ap,
                     metrics={"cosine_ap": ap, "cosine_accuracy": 100.0 * best_accuracy(cos, labels),
                              "cosine_f1": 100.0 * best_f1(cos, labels)})
