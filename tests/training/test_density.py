"""The latent density behind the density-<c> kinds (``training.density``): the artifact's ``latent_log_density``
is the class-balanced mixture of scikit-learn's per-class fits, computed independently here; a row's value does
not depend on its batch; how many components a class gets; unlabelled data is one class."""

import math

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from sklearn.mixture import GaussianMixture

from training import density, export
from training.data import to_8bit
from training.model import VAE, VAEConfig
from vae_artifact.io import load_artifact


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return VAE(VAEConfig(channels=1, height=8, width=8, latent_dim=4, base_width=8, hidden=32, levels=17)).eval()


def served_features(vae, images: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        mu, logvar = export.ServingModule(vae).encode(torch.from_numpy(images).float() / 255)
    # The mean log-variance in float32, as the artifact computes it from its float32 encoder.
    return np.concatenate([mu.numpy(), logvar.mean(dim=1, keepdim=True).numpy()], axis=1).astype(np.float64)


def test_the_artifact_computes_the_class_balanced_mixture_of_the_per_class_fits(vae, digits_dataset, tmp_path):
    train = digits_dataset.train
    fitted = density.fit_split(export.ServingModule(vae).encode, train, digits_dataset.levels, torch.device("cpu"),
                               seed=1)
    serving = export.ServingModule(vae, density=fitted)
    path = tmp_path / "vae.ts"
    meta = export.export_artifact(serving, path, export.build_metadata(serving), check_x=torch.rand(4, 1, 8, 8))
    assert "latent_log_density" in meta["methods"]
    module, _ = load_artifact(path)

    feats = served_features(vae, to_8bit(train.images, digits_dataset.levels))
    classes = np.unique(train.labels)
    test = to_8bit(digits_dataset.test.images[:40], digits_dataset.levels)
    test_feats = served_features(vae, test)
    per_class = []
    for c in classes:  # scikit-learn's own density of each class's mixture, fitted as the module docstring says
        k = max(1, min(8, int((train.labels == c).sum()) // (10 * 5)))
        gmm = GaussianMixture(k, covariance_type="full", reg_covar=1e-5, random_state=1).fit(feats[train.labels == c])
        per_class.append(gmm.score_samples(test_feats))
    expected = logsumexp(np.stack(per_class), axis=0) - math.log(len(classes))
    with torch.inference_mode():
        got = module.latent_log_density(torch.from_numpy(test).float() / 255)
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-9, atol=1e-9)
    assert fitted.summary["components"] == len(fitted.means) == sum(v["components"] for v in
                                                                    fitted.summary["classes"].values())
    assert np.ptp(expected) > 1.0  # images differ in density: not a vacuous comparison


def test_a_rows_log_density_does_not_depend_on_its_batch(vae, digits_dataset):
    fitted = density.fit_split(export.ServingModule(vae).encode, digits_dataset.train, digits_dataset.levels,
                               torch.device("cpu"))
    feats = torch.from_numpy(served_features(vae, to_8bit(digits_dataset.test.images, digits_dataset.levels)))
    whole = density.log_density(fitted, feats)
    for size in (1, 3, 16):
        parts = torch.cat([density.log_density(fitted, feats[i:i + size]) for i in range(0, len(feats), size)])
        torch.testing.assert_close(parts, whole, atol=0, rtol=0)


def test_components_follow_the_images_a_class_has_and_unlabelled_data_is_one_class():
    assert density.components_for(100, 17, labelled=True) == 1
    assert density.components_for(5000, 17, labelled=True) == 8
    assert density.components_for(500, 17, labelled=True) == 2
    assert density.components_for(60000, 17, labelled=False) == 32
    rng = np.random.default_rng(0)
    feats = np.concatenate([rng.normal(0, 1, (600, 3)), rng.normal(6, 1, (600, 3))])
    unlabelled = density.fit(feats, np.full(1200, -1))
    assert not unlabelled.summary["class_conditional"] and list(unlabelled.summary["classes"]) == ["all"]
    assert unlabelled.summary["components"] == density.components_for(1200, 3, labelled=False) == 32
    labelled = density.fit(feats, np.repeat([3, 5], 600))
    assert labelled.summary["class_conditional"] and set(labelled.summary["classes"]) == {"3", "5"}
    # Equal class weights: the two classes' mixtures each carry half the mass.
    weights = np.exp(labelled.log_constant.numpy() - np.log(np.diagonal(labelled.precision_cholesky.numpy(),
                                                                          axis1=1, axis2=2)).sum(axis=1)
                     + 0.5 * 3 * math.log(2 * math.pi))
    assert weights.sum() == pytest.approx(1.0) and weights[labelled.means[:, 0].numpy() > 3].sum() == pytest.approx(0.5)
