"""The build-time gate's Spearman statistic: the expected ΔSpearman is unbiased and far steadier than the realized one."""

from __future__ import annotations

import numpy as np

from sfr_export.quant.sensitivity import Fidelity, Targets, fidelity


def _draw(seed: int, n: int = 400, noise: float = 0.05) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reference embeddings of n pairs, a candidate with error independent of the gold scores, gold scores."""
    rng = np.random.default_rng(seed)
    ref = rng.normal(size=(2 * n, 16))
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    cand = ref + noise * rng.normal(size=ref.shape)
    cand /= np.linalg.norm(cand, axis=1, keepdims=True)
    gold = (ref[:n] * ref[n:]).sum(1) + 0.3 * rng.normal(size=n)
    return ref, cand, gold


def test_expected_delta_tracks_the_realized_mean_with_less_spread():
    fids = [fidelity(r, c, r, c, g) for r, c, g in (_draw(s) for s in range(30))]
    realized = np.array([f.spearman_delta for f in fids])
    expected = np.array([f.spearman_expected for f in fids])
    assert realized.mean() < -1.0  # the error costs Spearman points on average (attenuation)
    assert abs(expected.mean() - realized.mean()) < 0.25 * abs(realized.mean())
    assert expected.std() < 0.4 * realized.std()
    boot = np.array([f.spearman_expected_noise for f in fids])
    assert 0.3 * expected.std() < boot.mean() < 3.0 * expected.std()  # the bootstrap std is the right size


def test_no_error_means_no_expected_loss():
    r, _, g = _draw(0)
    f = fidelity(r, r, r, r, g)
    assert abs(f.spearman_expected) < 1e-9 and abs(f.spearman_delta) < 1e-9 and f.spearman_expected_noise < 1e-9


def test_gate_decides_on_the_expected_delta():
    t = Targets()
    base = dict(cos_mean=0.999, cos_p1=0.998, cos_min=0.997, spearman_ref=30.0, spearman_noise=0.4)
    # a realized delta inside twice the noise floor, but an expected loss beyond the target: refused
    assert not t.met(Fidelity(**base, spearman_delta=-0.5, spearman_expected=-0.45, spearman_expected_noise=0.05))
    # an expected loss within the target passes even when the realized delta of few pairs swings past 0.3
    assert t.met(Fidelity(**base, spearman_delta=-0.6, spearman_expected=-0.1, spearman_expected_noise=0.05))
    # the realized delta still guards against what the expectation cannot see (error aligned with the gold scores)
    assert not t.met(Fidelity(**base, spearman_delta=-2.0, spearman_expected=-0.1, spearman_expected_noise=0.05))
    # that guard measures the realized delta's departure from the expected loss, not its distance from zero
    assert t.met(Fidelity(**base, spearman_delta=-0.95, spearman_expected=-0.25, spearman_expected_noise=0.05))
    assert not t.met(Fidelity(**base, spearman_delta=-0.95, spearman_expected=0.0, spearman_expected_noise=0.05))
