"""InfoNCE on hand-computable cases, the false-negative mask, and GradCache == plain backward."""

from __future__ import annotations

import math

import pytest
import torch

from sfr_export.errors import TrainingError
from sfr_export.finetune.loss import build_layout, gradcache_backward, info_nce

E0, E1, E2 = torch.eye(3)


def _loss(q, pos, negs, texts_q, texts_p, texts_n, in_batch, t=1.0):
    layout = build_layout(texts_q, texts_p, texts_n, in_batch)
    docs = torch.stack(pos + [n for row in negs for n in row])
    return info_nce(torch.stack(q), docs, layout, t).item()


def test_one_row_one_hard_negative():
    # logits [1, 0] -> -log(e / (e + 1)) = log(1 + e^-1)
    got = _loss([E0], [E0], [[E1]], ["q"], ["p"], [["n"]], [True])
    assert got == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)


def test_temperature_scales_logits():
    got = _loss([E0], [E0], [[E1]], ["q"], ["p"], [["n"]], [True], t=0.5)
    assert got == pytest.approx(math.log(1 + math.exp(-2)), abs=1e-6)


def test_in_batch_negatives_on_and_off():
    # row 0: own positive e0 (logit 1), other row's positive e1 (0), other row's negative e2 (0)
    q, pos, negs = [E0, E1], [E0, E1], [[E2], [E2]]
    on = _loss(q, pos, negs, ["a", "b"], ["pa", "pb"], [["n1"], ["n2"]], [True, True])
    # each row: logits [1 (own pos), 0 (own neg), 0 (other pos), 0 (other neg)] -> log(1 + 3/e)
    assert on == pytest.approx(math.log(1 + 3 / math.e), abs=1e-6)
    off = _loss(q, pos, negs, ["a", "b"], ["pa", "pb"], [["n1"], ["n2"]], [False, False])
    assert off == pytest.approx(math.log(1 + 1 / math.e), abs=1e-6)  # own negative only
    mixed = _loss(q, pos, negs, ["a", "b"], ["pa", "pb"], [["n1"], ["n2"]], [True, False])
    assert mixed == pytest.approx((math.log(1 + 3 / math.e) + math.log(1 + 1 / math.e)) / 2, abs=1e-6)


def test_no_negatives_at_all_gives_zero_loss():
    assert _loss([E0, E1], [E0, E1], [[], []], ["a", "b"], ["pa", "pb"], [[], []], [False, False]) == pytest.approx(0.0)


def test_duplicate_positive_texts_are_not_negatives():
    # both rows have the same positive text: in-batch it would be a false negative, so it is masked
    q, pos = [E0, E0], [E0, E0]
    assert _loss(q, pos, [[], []], ["a", "b"], ["same", "same"], [[], []], [True, True]) == pytest.approx(0.0, abs=1e-6)
    # same query text with different positives: each positive is a positive of the other row too
    q, pos = [E0, E0], [E1, E2]
    assert _loss(q, pos, [[], []], ["x", "x"], ["p1", "p2"], [[], []], [True, True]) == pytest.approx(0.0, abs=1e-6)
    # different texts: the other row's positive counts (logits [0, 0] -> log 2)
    assert _loss(q, pos, [[], []], ["x", "y"], ["p1", "p2"], [[], []], [True, True]) == pytest.approx(math.log(2), abs=1e-6)


def test_matches_an_explicit_formula_on_random_vectors():
    g = torch.Generator().manual_seed(0)
    B, k, d, t = 5, 2, 8, 0.07
    q = torch.nn.functional.normalize(torch.randn(B, d, generator=g), dim=-1)
    p = torch.nn.functional.normalize(torch.randn(B, d, generator=g), dim=-1)
    n = torch.nn.functional.normalize(torch.randn(B, k, d, generator=g), dim=-1)
    in_batch = [True, False, True, True, False]
    layout = build_layout([f"q{i}" for i in range(B)], [f"p{i}" for i in range(B)],
                          [[f"n{i}{j}" for j in range(k)] for i in range(B)], in_batch)
    got = info_nce(q, torch.cat([p, n.reshape(B * k, d)]), layout, t).item()
    total = 0.0
    for i in range(B):
        cands = [p[i]] + list(n[i])
        if in_batch[i]:
            cands += [p[j] for j in range(B) if j != i] + [n[j, m] for j in range(B) if j != i for m in range(k)]
        logits = torch.stack([q[i] @ c for c in cands]) / t
        total += -(logits[0] - torch.logsumexp(logits, 0)).item()
    assert got == pytest.approx(total / B, rel=1e-5)


def test_layout_errors():
    with pytest.raises(TrainingError, match="same number of hard negatives"):
        build_layout(["a", "b"], ["p", "q"], [["n"], []], [True, True])
    with pytest.raises(TrainingError, match="does not split evenly"):
        build_layout(["a", "b", "c"], ["p", "q", "r"], [[], [], []], [True] * 3, world=2)
    layout = build_layout(["a"], ["p"], [[]], [True])
    with pytest.raises(TrainingError, match="temperature"):
        info_nce(E0[None], E0[None], layout, 0.0)


class _Encoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(50, 16)
        self.drop = torch.nn.Dropout(0.3)
        self.proj = torch.nn.Linear(16, 8)

    def forward(self, ids):
        return torch.nn.functional.normalize(self.proj(self.drop(self.emb(ids).mean(1))), dim=-1)


def test_gradcache_equals_plain_backward_with_dropout():
    torch.manual_seed(0)
    model = _Encoder().train()
    B, k = 6, 2
    ids_q = torch.randint(0, 50, (B, 5))
    ids_d = torch.randint(0, 50, (B * (1 + k), 5))
    layout = build_layout([f"q{i}" for i in range(B)], [f"p{i}" for i in range(B)],
                          [[f"n{i}{j}" for j in range(k)] for i in range(B)], [True] * B)

    def loss_fn(q, d):
        return info_nce(q, d, layout, 0.05)

    torch.manual_seed(42)
    plain = loss_fn(model(ids_q), model(ids_d))
    plain.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    torch.manual_seed(42)
    # chunks in the same order as the plain forward: queries (2 chunks of 3), documents (chunks of 4)
    cached = gradcache_backward(model, [ids_q[:3], ids_q[3:]], [ids_d[i:i + 4] for i in range(0, len(ids_d), 4)],
                                loss_fn)
    assert cached.item() != pytest.approx(0.0)
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, ref[n], atol=1e-6), n
    # dropout differs per chunk, so the cached loss equals a plain run with the same per-chunk RNG draws only;
    # the gradients above prove the replay. Without dropout the losses agree exactly:
    model.eval()
    model.zero_grad()
    plain_eval = loss_fn(model(ids_q), model(ids_d))
    cached_eval = gradcache_backward(model, [ids_q[:3], ids_q[3:]], [ids_d[:9], ids_d[9:]], loss_fn)
    assert cached_eval.item() == pytest.approx(plain_eval.item(), rel=1e-6)
