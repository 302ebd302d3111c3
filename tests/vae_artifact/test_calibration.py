"""Conformal p-values, thresholds and importance-sampling statistics on synthetic numbers."""

import math

import numpy as np
import pytest

from vae_artifact.calibration import Calibration, importance_stats
from vae_artifact.metadata import Metadata


def brute_p(cal, s):
    return (1 + sum(c >= s for c in cal)) / (len(cal) + 1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_p_value_is_the_conformal_formula(seed):
    rng = np.random.default_rng(seed)
    cal_scores = np.round(rng.normal(100, 10, size=200), 1)  # rounding makes ties
    cal = Calibration(np.sort(cal_scores), k=32)
    s = np.concatenate([rng.normal(100, 15, size=50), cal_scores[:10], [-1e9, 1e9]])
    expected = [brute_p(cal_scores, v) for v in s]
    np.testing.assert_allclose(cal.p_values(s), expected)
    np.testing.assert_allclose(cal.percentiles(s), [100 * np.mean(cal_scores < v) for v in s])


@pytest.mark.parametrize("n, alpha", [(99, 0.01), (100, 0.01), (1000, 0.05), (999, 0.05), (20, 0.05), (10, 0.3)])
def test_threshold_flags_exactly_the_scores_with_p_at_most_alpha(n, alpha):
    rng = np.random.default_rng(n)
    cal = Calibration(np.sort(np.round(rng.normal(size=n), 2)), k=1)
    t = cal.threshold(alpha)
    probes = np.concatenate([cal.scores, cal.scores + 1e-9, cal.scores - 1e-9, [-50, 50]])
    flagged = cal.p_values(probes) <= alpha
    if t is None:
        assert not flagged.any()
    else:
        np.testing.assert_array_equal(flagged, probes > t)


def test_threshold_is_none_when_alpha_is_below_what_n_can_resolve():
    cal = Calibration(np.arange(10.0), k=1)
    assert cal.threshold(0.05) is None  # the smallest possible p-value is 1/11 > 0.05
    assert cal.p_values(np.array([1e9]))[0] == pytest.approx(1 / 11)


def test_false_positive_rate_is_at_most_alpha_on_exchangeable_data():
    rng = np.random.default_rng(7)
    cal = Calibration(np.sort(rng.gamma(3.0, size=1000)), k=1)
    fresh = rng.gamma(3.0, size=200_000)
    for alpha in (0.01, 0.05, 0.1):
        fpr = np.mean(cal.p_values(fresh) <= alpha)
        assert 0.5 * alpha <= fpr <= alpha + 3 * math.sqrt(alpha / 1000), (alpha, fpr)


def test_two_sided_flags_both_tails():
    cal = Calibration(np.arange(1.0, 1001.0), k=1)
    low, mid, high = cal.p_values(np.array([0.0, 500.5, 2000.0]), tail="two-sided")
    assert low == pytest.approx(2 / 1001) and high == pytest.approx(2 / 1001)
    assert mid == 1.0
    upper_low = cal.p_values(np.array([0.0]))[0]
    assert upper_low == 1.0  # the upper tail never flags a too-likely input


def test_importance_stats_match_a_direct_computation():
    rng = np.random.default_rng(3)
    log_w = rng.normal(-200, 2, size=(4, 64))
    stats = importance_stats(log_w)
    w = np.exp(log_w - log_w.max())  # a common scale does not change either statistic
    for i in range(4):
        se = w[i].std(ddof=1) / (math.sqrt(64) * w[i].mean())
        ess = w[i].sum() ** 2 / (w[i] ** 2).sum()
        assert stats["se"][i] == pytest.approx(se)
        assert stats["ess"][i] == pytest.approx(ess)
    equal = importance_stats(np.zeros((1, 16)))
    assert equal["ess"][0] == pytest.approx(16) and equal["se"][0] == pytest.approx(0)


def test_calibration_comes_from_metadata():
    model = {"image": {"channels": 1, "height": 8, "width": 8}, "latent_dim": 4}
    meta = Metadata.from_dict({"format_version": 1, "model": model,
                               "calibration": {"k": 8, "scores": {"nll": [3.0, 1.0, 2.0]}}})
    cal = Calibration.from_metadata(meta)
    assert cal.k == 8 and cal.scores.tolist() == [1.0, 2.0, 3.0]
    assert Calibration.from_metadata(Metadata.from_dict({"format_version": 1, "model": model})) is None


def test_scores_at_another_k_than_the_calibrations_are_not_calibrated():
    """Rows and summary of the service's pure functions: a K other than the calibration's nulls every field that
    compares with the calibration scores; the same K fills them."""
    from service.core.scoring import calibration_summary, score_rows

    rng = np.random.default_rng(0)
    outputs = {"iw_ll": -rng.uniform(90, 110, 3), "elbo": -rng.uniform(110, 120, 3), "rec": -rng.uniform(80, 90, 3),
               "kl": rng.uniform(20, 30, 3), "log_w": rng.normal(-100, 1, (3, 8))}
    cal = Calibration(np.sort(rng.normal(100, 5, 200)), k=8)
    for tail in ("upper", "two-sided"):
        same = score_rows(outputs, num_dims=64, calibration=cal, alpha=0.05, tail=tail, k=8)
        other = score_rows(outputs, num_dims=64, calibration=cal, alpha=0.05, tail=tail, k=16)
        assert all(r["p_value"] is not None and r["is_anomaly"] is not None for r in same)
        assert all(r["p_value"] is None and r["percentile"] is None and r["is_anomaly"] is None for r in other)
        assert [r["score_nats"] for r in other] == [r["score_nats"] for r in same]
        summary = calibration_summary(cal, 0.05, tail, 16)
        assert summary["calibrated"] is False and (summary["n"], summary["k"]) == (200, 8)
        assert summary["threshold_nats"] is None and summary["threshold_low_nats"] is None
        assert calibration_summary(cal, 0.05, tail, 8)["threshold_nats"] is not None
