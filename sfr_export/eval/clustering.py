"""Clustering evaluator: V-measure of mini-batch k-means, MTEB's bootstrapped ("fast") clustering protocol.

Follows mteb 2.x ``mteb/abstasks/clustering.py`` (``AbsTaskClustering``, the class ClusTREC-Covid uses) and its
``_evaluate_clustering_bootstrapped``: ``n_clusters = 10`` experiments; each draws ``max_documents_per_cluster =
16384`` rows *with replacement* with ``random.Random(seed).choices`` and fits ``MiniBatchKMeans(n_clusters=<number of
gold labels>, batch_size=512, init="k-means++", n_init=1, random_state=seed)``; the score is the mean
``v_measure_score`` (the task's ``main_score``, ``v_measure``).

Deviation: MTEB first embeds only ``max_fraction_of_documents_to_embed = 4%`` of the corpus (91 of the 2284
ClusTREC documents); a fidelity suite is already a subset, so ``max_fraction`` defaults to ``None`` (embed every
row of the suite) and can be set to 0.04 to follow MTEB to the letter.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

from .result import TaskScore
from .tasks import ClusteringTask


@dataclass(frozen=True)
class ClusteringProtocol:
    n_experiments: int = 10
    cluster_size: int = 16_384
    kmeans_batch_size: int = 512
    seed: int = 42
    max_fraction: float | None = None


def evaluate_clustering(task: ClusteringTask, emb: dict[str, np.ndarray],
                        protocol: ClusteringProtocol = ClusteringProtocol()) -> TaskScore:
    from sklearn.cluster import MiniBatchKMeans
    from sklearn.metrics.cluster import v_measure_score

    x = np.asarray(emb["texts"], dtype=np.float32)
    labels = np.asarray(task.labels)
    rng = random.Random(protocol.seed)
    if protocol.max_fraction is not None:
        keep = rng.sample(range(len(labels)), k=max(2, int(protocol.max_fraction * len(labels))))
        x, labels = x[keep], labels[keep]
    model = MiniBatchKMeans(n_clusters=np.unique(labels).size, batch_size=protocol.kmeans_batch_size,
                            init="k-means++", n_init=1, random_state=protocol.seed)
    scores: list[float] = []
    for _ in range(protocol.n_experiments):
        idx = rng.choices(range(len(labels)), k=protocol.cluster_size)
        assign = model.fit_predict(x[idx])
        scores.append(float(v_measure_score(labels[idx], assign)))
    v = 100.0 * float(np.mean(scores))
    return TaskScore(task=task.name, type=task.type, main_metric="v_measure", main=v,
                     metrics={"v_measure": v, "v_measure_std": 100.0 * float(np.std(scores))})
