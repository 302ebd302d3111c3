"""/anomaly-score?score=fisher-bz2, fisher-bz2-nn and density-bz2 on the session's digits artifact: the served score
equals an independent slow computation (float64 eager NLL, bz2 of the snapped image, the latent distance to the
nearest row of the artifact's bank, the latent density from scipy's Gaussians, the artifact's reference values
counted one by one); its p-values on fresh normal images are uniform, noise is flagged; a malformed combination,
or a kind whose latent method the artifact lacks, is not offered."""

import bz2
import io
import math

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from scipy.stats import multivariate_normal

from service.core.scoring import ScoreKinds
from tests.service.api.test_anomaly_kinds import slow_iw_score
from tests.vae_artifact.test_combination import slow_fisher
from vae_artifact.io import load_artifact
from vae_artifact.metadata import Metadata

NPY = "application/x-npy"
KIND = "fisher-bz2"
KINDS = (KIND, "fisher-bz2-nn", "density-bz2")


def post(client, images, query):
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(images), allow_pickle=False)
    response = client.post(f"/anomaly-score?{query}", content=buf.getvalue(), headers={"content-type": NPY})
    assert response.status_code == 200, response.text
    return response.json()


def slow_bits(image: np.ndarray, levels: int) -> float:
    """bz2's size in bits of the image snapped to the model's pixel levels, written out."""
    snapped = np.round(np.round(image * ((levels - 1) / 255.0)) * (255.0 / (levels - 1))).astype(np.uint8)
    return 8.0 * len(bz2.compress(snapped.tobytes(), 9))


def slow_neighbour_distance(module, image: np.ndarray) -> float:
    """Distance from the image's posterior mean to the nearest row of the artifact's bank, in float64 numpy."""
    with torch.inference_mode():
        mu = module.encode(torch.from_numpy(image[None]).float() / 255)[0].double().numpy()[0]
    bank = module.latent_bank.double().numpy()
    return float(np.sqrt(((bank - mu) ** 2).sum(axis=1)).min())


def slow_log_density(module, image: np.ndarray) -> float:
    """log q of the image's features (posterior mean, mean log-variance) under the artifact's mixture, each
    component by scipy from its covariance (the inverse of U U^T) and its weight."""
    with torch.inference_mode():
        mu, logvar = module.encode(torch.from_numpy(image[None]).float() / 255)
    f = np.concatenate([mu.numpy()[0], logvar.mean(dim=1).numpy()]).astype(np.float64)
    means, factors = module.density_means.numpy(), module.density_precision_cholesky.numpy()
    log_det = np.log(np.diagonal(factors, axis1=1, axis2=2)).sum(axis=1)
    log_weights = module.density_log_constant.numpy() - log_det + 0.5 * len(f) * math.log(2 * math.pi)
    assert np.exp(log_weights).sum() == pytest.approx(1.0)
    return float(logsumexp([w + multivariate_normal(m, np.linalg.inv(u @ u.T)).logpdf(f)
                            for w, m, u in zip(log_weights, means, factors)]))


@pytest.mark.parametrize("kind", KINDS)
def test_served_score_equals_an_independent_slow_computation(client, digits_artifact, digit_images, noise_images,
                                                             digits_dataset, kind):
    module, meta = load_artifact(digits_artifact)
    spec, k = meta["scoring"]["kinds"][kind]["combination"], meta["scoring"]["k"]
    assert spec["reference_split"] == "val" and all(t["n"] == len(t["reference"]) > 0 for t in spec["terms"])
    batch = np.concatenate([noise_images[:2], digit_images[20:26]])
    rows = post(client, batch, f"score={kind}")["scores"]
    assert spec["beyond"] == "exponential"
    if kind != "fisher-bz2-nn":
        assert all(row["neighbour_distance"] is None for row in rows)
    else:  # the bank: every training image of the small digits set (fewer than the default 10,000)
        assert module.latent_bank.shape == (len(digits_dataset.train), meta.latent_dim)
        assert [t["statistic"] for t in spec["terms"]][-1] == "latent-nn"
    assert all((row["latent_density_nats"] is None) == (kind != "density-bz2") for row in rows)
    for row, image in zip(rows, batch):
        slow = slow_iw_score(digits_artifact, image, k)
        assert (row["nll_nats"], row["elbo_nats"]) == (pytest.approx(slow["nll_nats"], rel=1e-4, abs=1e-3),
                                                       pytest.approx(slow["elbo_nats"], rel=1e-4, abs=1e-3))
        bits = slow_bits(image, meta.levels)
        assert row["complexity_bits"] == bits
        # The combination on the served NLL and ELBO (float32 model outputs; the float64 ones above agree to
        # their rounding): a step function inside the references, so its inputs must be the same numbers.
        if kind == KIND:
            assert row["score_nats"] == pytest.approx(slow_fisher(row["nll_nats"], row["elbo_nats"], bits, spec),
                                                      rel=1e-12)
            continue
        if kind == "density-bz2":
            log_density = -row["latent_density_nats"]
            # The encoder's float32 rounding of a lone row (the service pads it), amplified by tight components.
            assert log_density == pytest.approx(slow_log_density(module, image), rel=1e-5, abs=1e-5)
            assert row["score_nats"] == pytest.approx(
                slow_fisher(row["nll_nats"], row["elbo_nats"], bits, spec, log_density=log_density), rel=1e-12)
            continue
        distance = row["neighbour_distance"]
        assert distance == pytest.approx(slow_neighbour_distance(module, image), rel=1e-5, abs=1e-6)
        assert row["score_nats"] == pytest.approx(slow_fisher(row["nll_nats"], row["elbo_nats"], bits, spec, distance),
                                                  rel=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_p_values_are_uniform_on_fresh_normal_images_and_noise_is_flagged(client, digit_images, noise_images, kind):
    """The digits test split (359 images never trained on, calibrated against or used as reference): the share
    with p <= alpha is alpha within sampling error (test and calibration sample sizes); noise: above every
    calibration score (the terms' tails past the reference keep it from topping out)."""
    bodies = [post(client, digit_images[i:i + 64], f"score={kind}") for i in range(0, len(digit_images), 64)]
    n_cal = bodies[0]["calibration"]["n"]
    p = np.array([row["p_value"] for body in bodies for row in body["scores"]])
    for alpha in (0.1, 0.25, 0.5, 0.75):
        exact = math.floor(alpha * (n_cal + 1)) / (n_cal + 1)
        sd = math.sqrt(alpha * (1 - alpha) * (1 / len(p) + 1 / n_cal))
        assert abs(np.mean(p <= alpha) - exact) < 3 * sd, (alpha, np.mean(p <= alpha))
    noise = post(client, noise_images, f"score={kind}")["scores"]  # alpha = 0.01 > 1/(n + 1) = 0.0069
    assert all(row["is_anomaly"] and row["p_value"] == pytest.approx(1 / (n_cal + 1)) for row in noise)


def test_a_malformed_combination_is_not_offered(digits_artifact):
    document = load_artifact(digits_artifact)[1].to_dict()
    assert KIND in ScoreKinds.from_metadata(Metadata.from_dict(document)).kinds
    broken = document["scoring"]["kinds"][KIND]["combination"]
    broken["terms"][0]["reference"] = "not a list"
    kinds = ScoreKinds.from_metadata(Metadata.from_dict(document))
    assert KIND not in kinds.kinds and "nll-minus-bz2" in kinds.kinds
    document["scoring"]["default"] = KIND
    # The default falls back to the next preferred kind on offer (without neighbours: no fisher-bz2-nn).
    assert ScoreKinds.from_metadata(Metadata.from_dict(document)).default == "nll-minus-bz2"


def test_a_latent_kind_is_offered_only_with_the_artifacts_method(digits_artifact):
    """The service passes the latent outputs the runtime computes: those whose methods the artifact lists (and
    has). An artifact whose default needs one, served without it: the next preferred kind, not plain nll."""
    meta = load_artifact(digits_artifact)[1]
    assert {"latent_neighbour_distance", "latent_log_density"} <= set(meta["methods"])
    both = ScoreKinds.from_metadata(meta, latent=frozenset({"latent_nn", "latent_log_density"}))
    assert {"fisher-bz2-nn", "density-bz2"} <= set(both.kinds) and both.default == meta.scoring.default == "density-bz2"
    bank_only = ScoreKinds.from_metadata(meta, latent=frozenset({"latent_nn"}))
    assert "density-bz2" not in bank_only.kinds and bank_only.default == "fisher-bz2-nn"
    neither = ScoreKinds.from_metadata(meta)
    assert not {"fisher-bz2-nn", "density-bz2"} & set(neither.kinds) and neither.default == KIND
