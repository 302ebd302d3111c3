"""The combined score kinds (``fisher-<compressor>[-nn]``, ``density-<compressor>``, ``vae_artifact.combination``):
the formula, written out independently; its conformal p-values are uniform on fresh normal data (and are not
when the reference sample is the calibration sample, the mistake the design avoids); each row's score is
independent of its batch; the artifact form round-trips and a malformed one is refused."""

import math

import numpy as np
import pytest

from vae_artifact import combination
from vae_artifact.calibration import Calibration


def normal_statistics(rng: np.random.Generator, n: int):
    """Synthetic (nll, elbo, bits) of "normal images": correlated, heavy-ish tailed, bits on the 8-bit grid,
    the ELBO below the bound."""
    bits = 8.0 * np.round(rng.normal(160.0, 20.0, size=n))
    nll = 0.55 * bits + rng.standard_t(5, size=n) * 15.0 + 300.0
    return nll, -nll - rng.gamma(4.0, 5.0, size=n), bits


def slow_tail_scale(ref: list, side: str) -> float:
    """Mean excess of the most extreme tenth (>= 1 value) over the next value inward, written out."""
    if len(ref) < 2:
        return 1.0
    ordered = sorted(ref, reverse=(side == "upper"))
    k = max(1, min(len(ref) - 1, math.ceil(len(ref) / 10)))
    scale = sum(abs(v - ordered[k]) for v in ordered[:k]) / k
    if scale > 0:
        return scale
    mean = sum(ref) / len(ref)
    spread = math.sqrt(sum((v - mean) ** 2 for v in ref) / len(ref))
    return spread if spread > 0 else 1.0


def slow_fisher(nll: float, elbo: float, bits: float, spec: dict, latent_nn: float = math.nan,
                log_density: float = math.nan) -> float:
    """-sum ln p over the artifact's terms, counting reference values one by one; past the reference's extreme
    (``beyond: exponential``) p continues as 1/(m + 1) exp(-excess / scale); a guard (``counted: beyond``) adds
    only that continuation's -ln exp(-excess / scale)."""
    stats = {"nll": nll, "iw-gap": -nll - elbo, "bits-bz2": bits, "nll-minus-bz2": nll - math.log(2.0) * bits,
             "latent-nn": latent_nn, "latent-density": -log_density}
    total = 0.0
    for term in spec["terms"]:
        v, ref = stats[term["statistic"]], term["reference"]
        upper = (1 + sum(1 for r in ref if r >= v)) / (len(ref) + 1)
        lower = (1 + sum(1 for r in ref if r <= v)) / (len(ref) + 1)
        upper_tail = lower_tail = 1.0
        if spec.get("beyond", "counts") == "exponential":
            upper_tail = math.exp(-max(0.0, v - max(ref)) / slow_tail_scale(ref, "upper"))
            lower_tail = math.exp(-max(0.0, min(ref) - v) / slow_tail_scale(ref, "lower"))
        if term.get("counted", "whole") == "beyond":
            upper, lower = 1.0, 1.0  # a guard: the tail alone
        upper, lower = upper * upper_tail, lower * lower_tail
        p = {"upper": upper, "lower": lower, "two-sided": min(1.0, 2 * min(upper, lower))}[term["tail"]]
        total -= math.log(p)
    return total


def test_scores_equal_the_formula_written_out():
    rng = np.random.default_rng(0)
    fitted = combination.Combination.fit("fisher-bz2", *normal_statistics(rng, 300))
    spec = fitted.to_dict()
    assert [(t["statistic"], t["tail"], t["counted"]) for t in spec["terms"]] == list(combination.recipe("fisher-bz2"))
    nll, elbo, bits = normal_statistics(rng, 50)
    # far simpler, noise (the model explains it far worse than bz2), a poor posterior fit (a large gap), typical
    nll[:4], elbo[:4], bits[:4] = [100.0, 9000.0, 1000.0, 1000.0], [-110, -9010, -1300, -1020], [8.0, 8000.0, 1280, 1280]
    fast = fitted.scores(nll, elbo, bits)
    np.testing.assert_allclose(fast, [slow_fisher(*row, spec) for row in zip(nll, elbo, bits)], rtol=1e-13)
    assert min(fast[:3]) > np.quantile(fast[4:], 0.9) and fast[3] < np.quantile(fast[4:], 0.9)


def test_the_neighbour_kind_adds_the_latent_distance_as_a_fourth_term():
    rng = np.random.default_rng(6)
    nll, elbo, bits = normal_statistics(rng, 300)
    distance = rng.gamma(3.0, 0.5, size=300)  # nearest-neighbour distances of normal images
    fitted = combination.Combination.fit("fisher-bz2-nn", nll, elbo, bits, {"latent_nn": distance})
    spec = fitted.to_dict()
    assert [(t["statistic"], t["tail"], t["counted"]) for t in spec["terms"]] == list(
        combination.recipe("fisher-bz2-nn"))
    assert spec["terms"][-1] == {"statistic": "latent-nn", "tail": "upper", "counted": "whole", "n": 300,
                                 "reference": sorted(distance.tolist())}
    assert fitted.latent_needs == {"latent_nn"}
    assert not combination.Combination.fit("fisher-bz2", nll, elbo, bits).latent_needs
    nll, elbo, bits = normal_statistics(rng, 40)
    distance = rng.gamma(3.0, 0.5, size=40)
    distance[:2] = [0.0, 50.0]  # on a training image's latent, far from every one
    fast = fitted.scores(nll, elbo, bits, {"latent_nn": distance})
    np.testing.assert_allclose(fast, [slow_fisher(*row, spec, d) for row, d in zip(zip(nll, elbo, bits), distance)],
                               rtol=1e-13)
    # Distance 0 adds nothing (p = 1); 50, past every reference distance, adds ln(m + 1) and its tail.
    nearest = fitted.scores(nll[1:2], elbo[1:2], bits[1:2], {"latent_nn": [0.0]})[0]
    tail = (50.0 - fitted.terms[3].reference[-1]) / fitted.terms[3].scales[0]
    assert fast[1] == pytest.approx(nearest + math.log(301) + tail, rel=1e-12) and fast[1] > nearest
    with pytest.raises(ValueError, match="latent_nn"):
        fitted.scores(nll, elbo, bits)
    assert combination.Combination.from_dict(spec).to_dict() == spec


def test_the_density_kind_is_the_density_surprise_with_guards_past_the_reference():
    """density-bz2: the latent density's whole surprise; nll-minus-bz2 and bits-bz2 add nothing inside their
    references and their tails past them, so an input that is typical in likelihood and complexity scores its
    density surprise alone, and one far simpler (or far worse explained) than every reference image scores more."""
    rng = np.random.default_rng(7)
    nll, elbo, bits = normal_statistics(rng, 300)
    log_density = -rng.gamma(9.0, 2.0, size=300)  # log q of normal images' latent features
    fitted = combination.Combination.fit("density-bz2", nll, elbo, bits, {"latent_log_density": log_density})
    spec = fitted.to_dict()
    assert [(t["statistic"], t["tail"], t["counted"]) for t in spec["terms"]] == [
        ("latent-density", "upper", "whole"), ("nll-minus-bz2", "upper", "beyond"), ("bits-bz2", "lower", "beyond")]
    assert spec["terms"][0]["reference"] == sorted((-log_density).tolist())  # the statistic is -log q
    assert fitted.latent_needs == {"latent_log_density"}
    nll, elbo, bits = normal_statistics(rng, 40)
    log_density = -rng.gamma(9.0, 2.0, size=40)
    bits[0], nll[0] = 8.0, 4.0  # far simpler than every reference image, explained as well as bz2 does
    fast = fitted.scores(nll, elbo, bits, {"latent_log_density": log_density})
    np.testing.assert_allclose(fast, [slow_fisher(*row, spec, log_density=q) for row, q in
                                      zip(zip(nll, elbo, bits), log_density)], rtol=1e-13)
    density_term = fitted.terms[0]
    alone = -np.log(combination.reference_p_values(density_term.reference, -log_density, "upper"))
    alone += density_term.past_reference(-log_density)
    inside = ((nll - math.log(2) * bits <= fitted.terms[1].reference[-1]) & (bits >= fitted.terms[2].reference[0]))
    assert inside[1:].all() and not inside[0]
    np.testing.assert_array_equal(fast[inside], alone[inside])  # guards inside their references: nothing added
    assert fast[0] > alone[0] + 5  # ... and past them, their tails
    with pytest.raises(ValueError, match="latent_log_density"):
        fitted.scores(nll, elbo, bits, {"latent_nn": np.zeros(40)})
    assert combination.Combination.from_dict(spec).to_dict() == spec
    with pytest.raises(ValueError, match="exponential"):  # a guard needs the tails
        combination.Combination.from_dict({**spec, "beyond": "counts"})


def test_past_the_reference_the_score_keeps_growing_and_older_artifacts_keep_their_counts():
    """An input far past every reference value scores higher than one just past it (no cap at ln(m + 1) a term),
    high enough to be flagged against any calibration sample; a spec without ``beyond`` is an artifact written
    before the tails, scored with counts as its stored calibration was."""
    rng = np.random.default_rng(5)
    fitted = combination.Combination.fit("fisher-bz2", *normal_statistics(rng, 144))  # the bundled digits' val size
    bits = np.full(4, np.median(fitted.terms[1].reference))  # typical complexity and posterior fit ...
    top = fitted.terms[0].reference[-1]  # ... and nll-minus-bz2 (upper tail) past the reference by 1..1000 nats
    nll = bits * math.log(2.0) + top + np.array([1.0, 10.0, 100.0, 1000.0])
    elbo = -nll - np.median(fitted.terms[2].reference)
    scores = fitted.scores(nll, elbo, bits)
    assert np.all(np.diff(scores) > 0)
    calibration = Calibration.of(fitted.scores(*normal_statistics(rng, 144)))
    assert calibration.p_values(scores[3:]).max() == pytest.approx(1 / 145)  # noise is thousands of nats past
    old = {key: value for key, value in fitted.to_dict().items() if key != "beyond"}
    counted = combination.Combination.from_dict(old)
    assert counted.beyond == "counts" and len(set(counted.scores(nll, elbo, bits))) == 1  # capped: all tied
    np.testing.assert_allclose(counted.scores(nll, elbo, bits), [slow_fisher(*r, old) for r in zip(nll, elbo, bits)],
                               rtol=1e-13)


def test_p_values_are_uniform_on_fresh_normal_data():
    """Reference and calibration samples apart: the conformal guarantee holds, FPR(alpha) ~ alpha."""
    rng = np.random.default_rng(1)
    fitted = combination.Combination.fit("fisher-bz2", *normal_statistics(rng, 2000))
    calibration = Calibration.of(fitted.scores(*normal_statistics(rng, 2000)))
    p = calibration.p_values(fitted.scores(*normal_statistics(rng, 20000)))
    for alpha in (0.01, 0.05, 0.1, 0.5):
        sd = math.sqrt(alpha * (1 - alpha) * (1 / 20000 + 1 / 2000))  # fresh sample + this calibration sample
        assert abs(np.mean(p <= alpha) - alpha) < 4 * sd + 1 / 2001, alpha


def test_reference_sample_reused_for_calibration_loses_the_guarantee():
    """Why training fits the references on the val split: fitted on the calib rows themselves, each calib row
    counts itself, its score is too low, and fresh normal images are flagged more often than alpha (averaged
    over calibration draws: the marginal rate the guarantee is about)."""
    rng = np.random.default_rng(2)
    reused, apart = [], []
    for _ in range(300):  # the mean rate's sd is ~0.0025
        calib, fresh = normal_statistics(rng, 50), normal_statistics(rng, 500)
        for fitted, rates in ((combination.Combination.fit("fisher-bz2", *calib), reused),
                              (combination.Combination.fit("fisher-bz2", *normal_statistics(rng, 50)), apart)):
            p = Calibration.of(fitted.scores(*calib)).p_values(fitted.scores(*fresh))
            rates.append(np.mean(p <= 0.1))
    assert np.mean(apart) < 0.1 + 0.0075 < np.mean(reused), (np.mean(apart), np.mean(reused))


def test_a_row_scores_the_same_in_any_batch():
    rng = np.random.default_rng(3)
    fitted = combination.Combination.fit("fisher-bz2", *normal_statistics(rng, 500))
    nll, elbo, bits = normal_statistics(rng, 257)
    whole = fitted.scores(nll, elbo, bits)
    for size in (1, 2, 7, 64):
        parts = np.concatenate([fitted.scores(nll[i:i + size], elbo[i:i + size], bits[i:i + size]) for i in range(0, 257, size)])
        np.testing.assert_array_equal(parts, whole)
    order = rng.permutation(257)
    np.testing.assert_array_equal(fitted.scores(nll[order], elbo[order], bits[order]), whole[order])


def test_artifact_form_round_trips_and_malformed_ones_are_refused():
    fitted = combination.Combination.fit("fisher-bz2", *normal_statistics(np.random.default_rng(4), 20))
    again = combination.Combination.from_dict(fitted.to_dict())
    assert again.to_dict() == fitted.to_dict()
    good = fitted.to_dict()
    for bad in ({**good, "method": "stouffer"}, {**good, "compressor": "lzma"}, {**good, "terms": []},
                {**good, "terms": [{**good["terms"][0], "statistic": "bits-png"}]},
                {**good, "terms": [{**good["terms"][0], "tail": "left"}]},
                {**good, "terms": [{**good["terms"][0], "reference": [1.0, float("nan")]}]},
                {**good, "terms": [{**good["terms"][0], "counted": "sometimes"}]},
                {**good, "beyond": "gaussian"}, None, []):
        with pytest.raises((ValueError, TypeError, KeyError)):
            combination.Combination.from_dict(bad)


def test_kind_names_and_their_recipes():
    assert combination.is_combined("density-bz2") and combination.is_combined("fisher-png-nn")
    assert not any(combination.is_combined(k) for k in ("nll", "nll-minus-bz2", "density-lzma", "fisher-", "density"))
    assert combination.compressor_of("density-zlib") == "zlib" and combination.compressor_of("fisher-bz2-nn") == "bz2"
    assert combination.latent_needs("density-bz2") == {"latent_log_density"}
    assert combination.latent_needs("fisher-bz2-nn") == {"latent_nn"} and not combination.latent_needs("fisher-bz2")
