"""Teacher mining: no positive is ever mined, likely false negatives are dropped, negatives come from the window.

The teacher is a real ``Embedder`` over a small deterministic bag-of-tokens runner (so rankings can be recomputed
by hand here); the torch and ONNX teachers are exercised in the CLI and round-trip tests."""

from __future__ import annotations

import random

import numpy as np
import pytest

from sfr_export.errors import TrainingError
from sfr_export.finetune.config import MiningConfig
from sfr_export.finetune.data import Example
from sfr_export.finetune.mining import mine_hard_negatives
from sfr_export.models.loading import load_tokenizer, resolve_model
from sfr_export.runtime.embedder import Embedder
from sfr_export.runtime.runner import Runner
from sfr_export.tokenization import TextTokenizer

DIM = 48


class BagOfTokensRunner(Runner):
    """Embedding = L2-normalised counts of token ids modulo DIM (padding ignored)."""

    name = "bag-of-tokens"

    def activate_impl(self) -> None:
        return None

    def infer_impl(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        out = np.zeros((input_ids.shape[0], DIM), dtype=np.float32)
        for r in range(input_ids.shape[0]):
            for t, m in zip(input_ids[r], attention_mask[r]):
                if m:
                    out[r, int(t) % DIM] += 1.0
        return out / np.linalg.norm(out, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def teacher():
    resolved = resolve_model("demo:tiny-mistral", compute_fingerprint=False)
    return Embedder(BagOfTokensRunner(), TextTokenizer(load_tokenizer(resolved.local_dir), resolved.spec))


WORDS = "virus cell protein bank card refund court law contract guitar horse river tax loan vaccine".split()


def _text(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6)))


def test_no_positive_is_ever_mined(teacher):
    rng = random.Random(0)
    for trial in range(6):
        queries = [_text(rng) for _ in range(8)]
        examples = []
        for q in queries:
            for _ in range(rng.randint(1, 3)):  # several positives per query, sometimes repeated texts
                examples.append(Example("T", "retrieval", "Find it", q, rng.choice([_text(rng), queries[0]])))
        corpus = [_text(rng) for _ in range(40)] + [e.positive for e in examples] + queries
        cfg = MiningConfig(rank_window=(0, 30), negatives=5, false_negative_ratio=1.5, seed=trial)
        mined, report = mine_hard_negatives(examples, teacher, cfg, corpora={"T": corpus})
        positives_of: dict[str, set[str]] = {}
        for e in examples:
            positives_of.setdefault(e.query, set()).add(e.positive)
        assert report.mined["T"] == len(examples)
        assert sum(len(e.negatives) for e in mined) > 2 * len(mined)
        for e in mined:
            assert len(e.negatives) <= 5
            assert not set(e.negatives) & positives_of[e.query]
            assert e.query not in e.negatives
            assert len(set(e.negatives)) == len(e.negatives)


def test_window_and_false_negative_rule(teacher):
    corpus = [f"{a} {b}" for a in WORDS for b in WORDS[:6]]
    ex = [Example("T", "retrieval", "", "virus cell protein", "virus cell protein vaccine")]
    q = teacher.encode(["virus cell protein"])[0]
    d = teacher.encode(corpus)
    pos = float(teacher.encode([ex[0].positive])[0] @ q)
    full = list(dict.fromkeys([*corpus, ex[0].positive]))
    scores = {t: float(v @ q) for t, v in zip(full, teacher.encode(full))}
    ranked = [t for t in sorted(full, key=lambda t: -scores[t]) if t != ex[0].positive]
    cfg = MiningConfig(rank_window=(3, 12), negatives=20, false_negative_ratio=0.9)
    mined, report = mine_hard_negatives(ex, teacher, cfg, corpora={"T": corpus})
    window = ranked[3:12]
    expected = [t for t in window if scores[t] <= 0.9 * pos]
    assert sorted(mined[0].negatives) == sorted(expected)
    assert report.dropped_false_negatives == len(window) - len(expected) > 0
    assert all(scores[t] <= 0.9 * pos for t in mined[0].negatives)
    assert d.shape[0] == len(corpus)


def test_other_types_pass_through_and_bad_corpus(teacher):
    ex = [Example("C", "classification", "", "card lost", "lost card", ("refund",)),
          Example("T", "retrieval", "", "virus", "virus cell")]
    mined, report = mine_hard_negatives(ex, teacher, MiningConfig(rank_window=(0, 5)))
    assert mined[0] == ex[0] and "C" not in report.mined
    with pytest.raises(TrainingError, match="not in the data"):
        mine_hard_negatives(ex, teacher, MiningConfig(), corpora={"Nope": ["x"]})


def test_shared_evaluators_through_an_embedder(teacher):
    from sfr_export.finetune.evaluate import retrieval_ndcg, sts_spearman

    s1 = ["virus cell protein", "bank card refund", "court law contract", "guitar horse river", "tax loan bank"]
    s2 = ["virus cell protein", "bank card loan", "river horse", "vaccine", "court"]
    gold = [5.0, 3.5, 0.5, 1.0, 0.0]
    assert sts_spearman(teacher, s1, s2, gold, task="STSBenchmark") > 0.6
    corpus = {f"d{i}": t for i, t in enumerate(s1)}
    queries = {f"q{i}": t for i, t in enumerate(s1)}
    qrels = {f"q{i}": {f"d{i}": 1} for i in range(len(s1))}
    assert retrieval_ndcg(teacher, corpus, queries, qrels, task="LegalSummarization") > 0.8
