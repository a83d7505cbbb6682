"""Classification evaluator: logistic regression on embeddings, MTEB's undersampling and experiment scheme.

Follows mteb 2.x ``mteb/abstasks/classification.py``:

* ``AbsTaskClassification`` defaults: ``evaluator_model = LogisticRegression(max_iter=100)`` with
  ``random_state`` set to the task seed (42), ``samples_per_label = 8``, ``n_experiments = 10``;
* ``_undersample_data``: for experiment *i* a fresh ``np.random.RandomState(seed)`` shuffles the *same* index list
  in place (so experiment *i* sees the list shuffled *i + 1* times), then the first ``samples_per_label`` rows of
  each label in that order are kept;
* ``_evaluate_subset``: the union of the selected training rows is embedded once; each experiment fits the
  classifier (``SklearnEvaluator``) on its rows and predicts the whole test split;
* ``_calculate_scores`` / ``_calculate_avg_scores``: accuracy (the ``main_score`` of Banking77Classification)
  and macro F1, averaged over the experiments.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from dataclasses import dataclass, replace

import numpy as np

from .result import TaskScore
from .tasks import ClassificationTask


@dataclass(frozen=True)
class ClassificationProtocol:
    samples_per_label: int = 8
    n_experiments: int = 10
    seed: int = 42
    max_iter: int = 100


def undersample(labels: list[str], protocol: ClassificationProtocol) -> list[list[int]]:
    """The training row indices of every experiment, exactly as ``AbsTaskClassification._undersample_data``."""
    idxs = list(range(len(labels)))
    out: list[list[int]] = []
    for _ in range(protocol.n_experiments):
        np.random.RandomState(protocol.seed).shuffle(idxs)
        count: dict[str, int] = defaultdict(int)
        chosen: list[int] = []
        for i in idxs:
            if count[labels[i]] < protocol.samples_per_label:
                chosen.append(i)
                count[labels[i]] += 1
        out.append(chosen)
    return out


def evaluate_classification(task: ClassificationTask, emb: dict[str, np.ndarray],
                            protocol: ClassificationProtocol = ClassificationProtocol()) -> TaskScore:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score

    train, test = np.asarray(emb["train"]), np.asarray(emb["test"])
    y_train = list(task.train_labels)
    y_test = list(task.test_labels)
    accs: list[float] = []
    f1s: list[float] = []
    experiments = task.experiments if task.experiments is not None else undersample(y_train, protocol)
    done: dict[tuple[int, ...], tuple[float, float]] = {}
    for rows in experiments:
        key = tuple(rows)
        if key not in done:  # identical training rows give the identical (deterministic) fit: reuse it
            clf = LogisticRegression(max_iter=protocol.max_iter, random_state=protocol.seed)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                clf.fit(train[list(rows)], [y_train[i] for i in rows])
            pred = clf.predict(test)
            done[key] = (float(accuracy_score(y_test, pred)), float(f1_score(y_test, pred, average="macro")))
        accs.append(done[key][0])
        f1s.append(done[key][1])
    acc = 100.0 * float(np.mean(accs))
    return TaskScore(task=task.name, type=task.type, main_metric="accuracy", main=acc,
                     metrics={"accuracy": acc, "f1": 100.0 * float(np.mean(f1s)),
                              "accuracy_std": 100.0 * float(np.std(accs))})


def embed_only_used_rows(task: ClassificationTask,
                         protocol: ClassificationProtocol = ClassificationProtocol()) -> ClassificationTask:
    """The task restricted to the union of training rows any experiment uses (mteb's ``union_idxs``), with the
    experiments' rows mapped to the new positions: same scores, fewer texts to embed."""
    if task.experiments is not None:
        return task
    experiments = undersample(list(task.train_labels), protocol)
    union = sorted(set().union(*experiments))
    pos = {j: k for k, j in enumerate(union)}
    return replace(task, train_texts=tuple(task.train_texts[j] for j in union),
                   train_labels=tuple(task.train_labels[j] for j in union),
                   experiments=tuple(tuple(pos[j] for j in rows) for rows in experiments))
