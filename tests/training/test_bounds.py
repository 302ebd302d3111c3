"""Burda et al. (2016) on a trained model: ELBO <= IW bound, and the IW bound does not decrease with K.

Each bound is averaged over the digits test set through the artifact's ``score`` method; differences are
paired per image and compared with three standard errors of their mean.
"""

import math

import pytest
import torch

from training.data import to_float
from vae_artifact.io import load_artifact

KS = (1, 4, 16, 64)


def mean_and_se(values: torch.Tensor) -> tuple:
    return values.mean().item(), values.std().item() / math.sqrt(len(values))


@pytest.fixture(scope="module")
def bounds(digits_artifact, digits_dataset):
    module, meta = load_artifact(digits_artifact)
    x = to_float(digits_dataset.test.images, digits_dataset.levels)
    d = meta["model"]["latent_dim"]
    out = {}
    with torch.inference_mode():
        for k in KS:
            gen = torch.Generator().manual_seed(100 + k)
            iw, elbo = [], []
            for xb in x.split(64):
                scores = module.score(xb, torch.randn(k, xb.shape[0], d, generator=gen))
                iw.append(scores[0])
                elbo.append(scores[1])
            out[k] = (torch.cat(iw).double(), torch.cat(elbo).double())
    return out


@pytest.mark.parametrize("k", KS)
def test_elbo_is_below_the_iw_bound(bounds, k):
    iw, elbo = bounds[k]
    gap, se = mean_and_se(iw - elbo)
    assert gap >= -3 * se, f"K={k}: mean IW - ELBO = {gap:.3f} (SE {se:.3f})"


@pytest.mark.parametrize("k_small, k_large", list(zip(KS[:-1], KS[1:])))
def test_iw_bound_does_not_decrease_with_k(bounds, k_small, k_large):
    diff, se = mean_and_se(bounds[k_large][0] - bounds[k_small][0])
    assert diff >= -3 * se, f"IW_{k_large} - IW_{k_small} = {diff:.3f} (SE {se:.3f})"


def test_more_samples_give_a_strictly_tighter_bound(bounds):
    # A trained VAE's posterior is not exact, so 64 samples must beat one by far more than the noise.
    diff, se = mean_and_se(bounds[64][0] - bounds[1][0])
    assert diff > 3 * se, f"IW_64 - IW_1 = {diff:.3f} (SE {se:.3f})"


def test_recorded_evaluation_respects_the_bounds(digits_artifact):
    ev = load_artifact(digits_artifact)[1]["evaluation"]
    assert ev["iw_k"] == 64
    # -NLL_IW >= ELBO up to noise; both per image, in nats, and consistent with bits/dim.
    assert -ev["iw_nll_nats"] >= ev["test_elbo_nats"] - 3 * (ev["iw_nll_se"] + ev["test_elbo_se"])
    assert ev["iw_nll_bits_per_dim"] == pytest.approx(ev["iw_nll_nats"] / (64 * math.log(2)))
    assert ev["elbo_bits_per_dim"] == pytest.approx(-ev["test_elbo_nats"] / (64 * math.log(2)))
    assert 1 <= ev["active_units"] <= ev["latent_dim"]
