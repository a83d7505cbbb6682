"""Each evaluator on small real data (TF-IDF embeddings: cheap, deterministic, and meaningful), cross-checked
against mteb's own implementation of the same protocol wherever mteb exposes it without downloading data."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from sfr_export.eval.classification import ClassificationProtocol, evaluate_classification, undersample
from sfr_export.eval.clustering import ClusteringProtocol, evaluate_clustering
from sfr_export.eval.evaluate import prepare, score
from sfr_export.eval.loaders import DEFAULT_FORMATS, Limits, load_task
from sfr_export.eval.pair_classification import evaluate_pair_classification
from sfr_export.eval.retrieval import evaluate_retrieval, mrr_at, ndcg_at, recall_at, top_k_overlap
from sfr_export.eval.sts import evaluate_sts
from sfr_export.eval.tasks import EvalDataError


def tfidf(groups: dict[str, tuple[str, ...]], lsa: int | None = None) -> dict[str, np.ndarray]:
    from sklearn.feature_extraction.text import TfidfVectorizer

    from sklearn.decomposition import TruncatedSVD

    corpus = [t for texts in groups.values() for t in texts]
    vec = TfidfVectorizer(sublinear_tf=True).fit(corpus)
    if lsa is None:
        return {k: vec.transform(list(v)).toarray().astype(np.float32) for k, v in groups.items()}
    svd = TruncatedSVD(n_components=lsa, random_state=0).fit(vec.transform(corpus))  # small dense vectors
    return {k: svd.transform(vec.transform(list(v))).astype(np.float32) for k, v in groups.items()}


def embed(task, lsa: int | None = None) -> dict[str, np.ndarray]:
    return tfidf({g.key: g.texts for g in task.groups()}, lsa)


def load(data_dir: Path, name: str, limits: Limits = Limits()):
    return load_task(data_dir / name, name, DEFAULT_FORMATS[name], limits)


def test_sts_spearman_of_cosine(data_dir: Path) -> None:
    task = load(data_dir, "STSBenchmark")
    s = evaluate_sts(task, embed(task))
    assert s.main_metric == "cosine_spearman"
    assert 40 < s.main < 75  # lexical overlap correlates with similarity, well below neural models (~82)
    # cos((1, g), (1, 0)) = 1 / sqrt(1 + g^2) is strictly decreasing in the gold score g: Spearman exactly -100
    gold = np.asarray(task.scores, dtype=np.float32)[:, None]
    anti = evaluate_sts(task, {"sentences1": np.hstack([np.ones_like(gold), gold]),
                               "sentences2": np.hstack([np.ones_like(gold), np.zeros_like(gold)])})
    assert anti.main == pytest.approx(-100.0)


def test_sts_matches_mteb_calculate_scores(data_dir: Path) -> None:
    import mteb

    task = load(data_dir, "BIOSSES")
    emb = embed(task)
    ours = evaluate_sts(task, emb)
    mteb_task = mteb.get_task("BIOSSES")
    from sklearn.metrics.pairwise import paired_cosine_distances

    cos = 1 - paired_cosine_distances(emb["sentences1"], emb["sentences2"])
    gold = [(s - 0) / (4 - 0) for s in task.scores]
    theirs = mteb_task._calculate_scores({"cosine_scores": cos.tolist(), "manhattan_distances": cos.tolist(),
                                         "euclidean_distances": cos.tolist(), "similarity_scores": None}, gold)
    assert ours.main == pytest.approx(100 * theirs["cosine_spearman"], abs=1e-9)


def test_classification_undersampling_is_mtebs(data_dir: Path) -> None:
    import mteb
    from datasets import Dataset

    task = load(data_dir, "Banking77Classification")
    mteb_task = mteb.get_task("Banking77Classification")
    ds = Dataset.from_dict({"label": list(task.train_labels)})
    idxs = None
    theirs = []
    for i in range(mteb_task.n_experiments):
        _, idxs, chosen = mteb_task._undersample_data(ds, i, idxs)
        theirs.append(chosen)
    assert undersample(list(task.train_labels), ClassificationProtocol()) == theirs
    assert (mteb_task.samples_per_label, mteb_task.n_experiments) == (8, 10)
    assert mteb_task.evaluator_model.get_params()["max_iter"] == ClassificationProtocol().max_iter


def test_classification_accuracy_on_real_banking77(data_dir: Path) -> None:
    full = load(data_dir, "Banking77Classification", Limits(max_train_per_label=12, max_test_per_label=4))
    emb = embed(full, lsa=64)
    s = evaluate_classification(full, emb)
    assert s.main_metric == "accuracy"
    assert 20 < s.main < 90  # far above chance (1.3%) with 8 examples per intent
    # prepare() embeds only the union of the experiments' training rows, with the same score
    small = prepare(full)
    union = sorted(set().union(*undersample(list(full.train_labels), ClassificationProtocol())))
    assert list(small.train_texts) == [full.train_texts[i] for i in union] and len(union) < 12 * 77
    # ... and each experiment trains on exactly the rows MTEB's undersampling picks from the full split
    assert small.experiments is not None
    assert [[union[j] for j in rows] for rows in small.experiments] == undersample(list(full.train_labels),
                                                                                  ClassificationProtocol())


def test_clustering_matches_mteb_bootstrap(data_dir: Path) -> None:
    from mteb.abstasks.clustering import _evaluate_clustering_bootstrapped

    task = load(data_dir, "ClusTREC-Covid", Limits(max_labels=6, max_per_label=20))
    emb = embed(task, lsa=32)
    proto = ClusteringProtocol(n_experiments=3, cluster_size=500)
    ours = evaluate_clustering(task, emb, proto)
    theirs, _ = _evaluate_clustering_bootstrapped(emb["texts"], [[label] for label in task.labels], n_clusters=3,
                                                  cluster_size=500, kmean_batch_size=512, max_depth=None,
                                                  rng_state=random.Random(42), seed=42)
    assert ours.main == pytest.approx(100 * float(np.mean(theirs["v_measure"]["Level 0"])), abs=1e-9)
    assert ours.main > 20  # topics are lexically distinct


def test_pair_classification_matches_mteb(data_dir: Path) -> None:
    import mteb

    task = load(data_dir, "TwitterURLCorpus", Limits(max_pairs=600))
    emb = embed(task)
    ours = evaluate_pair_classification(task, emb)
    from sklearn.metrics.pairwise import paired_cosine_distances

    cos = (1 - paired_cosine_distances(emb["sentences1"], emb["sentences2"])).tolist()
    theirs = mteb.get_task("TwitterURLCorpus")._compute_metrics_values(cos, np.asarray(task.labels), True)
    assert ours.metrics["cosine_ap"] == pytest.approx(100 * theirs["ap"], abs=1e-9)
    assert ours.metrics["cosine_accuracy"] == pytest.approx(100 * theirs["accuracy"], abs=1e-9)
    assert ours.metrics["cosine_f1"] == pytest.approx(100 * theirs["f1"], abs=1e-9)
    assert ours.main > 100 * np.mean(task.labels)  # better than the positive rate (random ranking)


def test_retrieval_metrics_match_pytrec_eval_and_mteb_mrr(data_dir: Path) -> None:
    from mteb._evaluators.retrieval_metrics import mrr as mteb_mrr

    pytrec_eval = pytest.importorskip("pytrec_eval", reason="pytrec-eval-terrier (the [dev] extra) cross-checks nDCG")
    task = load(data_dir, "TRECCOVID")
    emb = embed(task)
    ours = evaluate_retrieval(task, emb)
    q = emb["queries"] / np.linalg.norm(emb["queries"], axis=1, keepdims=True)
    d = emb["corpus"] / np.maximum(np.linalg.norm(emb["corpus"], axis=1, keepdims=True), 1e-12)
    sims = q @ d.T
    run = {qid: {task.corpus_ids[j]: float(sims[i, j]) for j in np.argsort(-sims[i])[:1000]}
           for i, qid in enumerate(task.query_ids)}
    ev = pytrec_eval.RelevanceEvaluator(task.qrels, {"ndcg_cut.10", "recall.100"}).evaluate(run)
    assert ours.metrics["ndcg_at_10"] == pytest.approx(100 * np.mean([v["ndcg_cut_10"] for v in ev.values()]), abs=1e-3)
    assert ours.metrics["recall_at_100"] == pytest.approx(100 * np.mean([v["recall_100"] for v in ev.values()]), abs=1e-3)
    theirs = mteb_mrr(task.qrels, run, [10])
    assert ours.metrics["mrr_at_10"] == pytest.approx(100 * np.mean(theirs["MRR@10"]), abs=1e-9)
    assert ours.main > 20 and set(ours.rankings) == set(task.query_ids)


def test_retrieval_metric_functions_by_hand() -> None:
    judged = {"a": 2, "b": 1, "c": 0}
    assert ndcg_at(["a", "b", "x"], judged, 10) == pytest.approx(1.0)
    expected = (1 / np.log2(2) + 2 / np.log2(3)) / (2 / np.log2(2) + 1 / np.log2(3))
    assert ndcg_at(["b", "a"], judged, 10) == pytest.approx(expected)
    assert recall_at(["x", "b"], judged, 1) == 0.0 and recall_at(["x", "b"], judged, 2) == 0.5
    assert mrr_at(["c", "x", "a"], judged, 10) == pytest.approx(1 / 3)
    assert top_k_overlap({"q": ["a", "b"]}, {"q": ["b", "z"]}) == 0.5


def test_retrieval_documents_get_no_instruction_queries_do(data_dir: Path) -> None:
    task = load(data_dir, "LegalSummarization", Limits(max_queries=3, max_corpus=10))
    sides = {g.key: g.side for g in task.groups()}
    assert sides == {"queries": "query", "corpus": "document"}
    from sfr_export.spec import ModelSpec

    spec = ModelSpec()
    q = spec.apply_prompt(["q"], "LegalSummarization", side="query")[0]
    d = spec.apply_prompt(["d"], "LegalSummarization", side="document")[0]
    assert q.startswith("Instruct: Given a summary of a legal text") and d == "d"


def test_score_refuses_missing_or_misshapen_embeddings(data_dir: Path) -> None:
    task = load(data_dir, "STSBenchmark", Limits(max_pairs=10))
    with pytest.raises(EvalDataError, match="sentences2"):
        score(task, {"sentences1": np.ones((10, 4), np.float32)})
    with pytest.raises(EvalDataError, match="wrong length"):
        score(task, {"sentences1": np.ones((10, 4), np.float32), "sentences2": np.ones((3, 4), np.float32)})
