"""The latent density behind the ``density-<c>`` score kinds, fitted when training writes the artifact (or when
``python -m training ood calibrate --latent-density`` adds it to an older one).

Each training image's features f(x) = (posterior mean, mean posterior log-variance), D + 1 numbers, from the
serving module's own ``encode`` of the 8-bit image (as served). The density q is a mixture of full-covariance
Gaussians over them:

- **class by class** when the data has labels: per class a mixture of its own, the classes weighted equally
  (Lee et al. 2018 fit one Gaussian a class to a classifier's features; one is too few here, a class has modes:
  a 7 with and without its bar). Equal weights: a rare class is as normal as a common one;
- **components** per class: as many as the class's images support, at least ten per covariance dimension, one
  to ``MAX_COMPONENTS``; unlabelled data is one class with up to ``MAX_COMPONENTS_UNLABELLED``;
- **the mean log-variance** as one more feature: how sure the encoder is of an image. An unseen class of the
  same kind of image can land near a seen class's means while the encoder is unusually sure or unsure of it
  (a held-out MNIST 1, thinner and simpler than any digit seen); the means alone miss those.

scikit-learn fits it (k-means initialisation, seeded); the artifact stores each component's mean, the Cholesky
factor of its precision and its log normalising constant with the weight folded in (``LatentDensity``), and
computes log q(f(x)) itself, row by row (``export.ServingModule.latent_log_density``).
"""

import logging
import math
from dataclasses import dataclass
from typing import Dict, Optional

import numpy as np
import torch
from torch import Tensor

log = logging.getLogger(__name__)

MAX_COMPONENTS = 8  # per class
MAX_COMPONENTS_UNLABELLED = 32  # unlabelled data: one class
POINTS_PER_DIMENSION = 10  # a component needs this many images per feature dimension
REG_COVAR = 1e-5  # added to each covariance's diagonal: keeps a tight component invertible
MAX_IMAGES = 60_000  # training images fitted on (a seeded sample when there are more)
ENCODE_ROWS = 1024


def features(mu: Tensor, logvar: Tensor) -> Tensor:
    """(B, D) posterior means and log-variances -> (B, D + 1) float64 features: the means and the mean
    log-variance. TorchScript compiles it into the artifact's ``latent_log_density``."""
    return torch.cat([mu, logvar.mean(dim=1, keepdim=True)], dim=1).double()


@dataclass(frozen=True)
class LatentDensity:
    """A fitted mixture, as the artifact's buffers hold it (float64): component m's density at f is
    exp(log_constant[m] - |(f - means[m]) @ precision_cholesky[m]|^2 / 2), q(f) their sum."""

    means: Tensor  # (M, F)
    precision_cholesky: Tensor  # (M, F, F), upper-triangular factors U with U U^T the precision
    log_constant: Tensor  # (M,): log weight + log det U - F/2 log(2 pi)
    summary: Dict  # what the artifact records about the fit

    @classmethod
    def empty(cls, dim: int) -> "LatentDensity":
        return cls(torch.zeros(0, dim, dtype=torch.float64), torch.zeros(0, dim, dim, dtype=torch.float64),
                   torch.zeros(0, dtype=torch.float64), {})


@torch.inference_mode()
def encode_features(encode, images: np.ndarray, device: torch.device) -> np.ndarray:
    """uint8 (N, C, H, W) -> (N, D + 1) float64 ``features`` through ``encode`` (the serving module's), x = u / 255."""
    parts = []
    for start in range(0, len(images), ENCODE_ROWS):
        x = torch.from_numpy(images[start:start + ENCODE_ROWS]).to(device).float().div_(255.0)
        mu, logvar = encode(x)
        parts.append(features(mu, logvar).cpu().numpy())
    return np.concatenate(parts) if parts else np.zeros((0, 0))


def fit_split(encode, split, levels: int, device: torch.device, seed: int = 0) -> LatentDensity:
    """The mixture of a ``training.data.Split``'s images (8-bit, as served) through ``encode``, by its labels."""
    from training.data import to_8bit

    feats = encode_features(encode, to_8bit(split.images, levels), device)
    return fit(feats, split.labels, seed=seed)


def components_for(n: int, dim: int, labelled: bool) -> int:
    """Components for a class of ``n`` images with ``dim`` features (the module docstring)."""
    cap = MAX_COMPONENTS if labelled else MAX_COMPONENTS_UNLABELLED
    return max(1, min(cap, n // (POINTS_PER_DIMENSION * dim)))


def fit(feats: np.ndarray, labels: Optional[np.ndarray], seed: int = 0) -> LatentDensity:
    """The mixture of ``feats`` (N, F), class by class when every image has a label and there are two or more."""
    from sklearn.mixture import GaussianMixture  # training-only dependency; keep it out of import time

    if len(feats) > MAX_IMAGES:
        picks = np.sort(np.random.default_rng(seed).choice(len(feats), size=MAX_IMAGES, replace=False))
        feats, labels = feats[picks], None if labels is None else labels[picks]
    labelled = labels is not None and bool((labels >= 0).all()) and len(np.unique(labels)) >= 2  # -1: unlabelled
    groups = {int(c): feats[labels == c] for c in np.unique(labels)} if labelled else {-1: feats}
    dim = feats.shape[1]
    means, factors, constants, per_class = [], [], [], {}
    for c, group in groups.items():
        k = components_for(len(group), dim, labelled)
        gmm = GaussianMixture(k, covariance_type="full", reg_covar=REG_COVAR, random_state=seed).fit(group)
        log_det = np.log(np.diagonal(gmm.precisions_cholesky_, axis1=1, axis2=2)).sum(axis=1)
        means.append(gmm.means_)
        factors.append(gmm.precisions_cholesky_)
        constants.append(np.log(gmm.weights_) - math.log(len(groups)) + log_det - 0.5 * dim * math.log(2 * math.pi))
        per_class[str(c) if labelled else "all"] = {"images": len(group), "components": k}
    as_tensor = lambda parts: torch.from_numpy(np.concatenate(parts)).double()  # noqa: E731
    summary = {"features": "posterior mean and mean posterior log-variance", "dim": dim,
               "class_conditional": labelled, "classes": per_class, "components": int(sum(len(m) for m in means)),
               "images": len(feats), "reg_covar": REG_COVAR, "seed": seed, "fit": "scikit-learn GaussianMixture, full"}
    log.info("latent density: %d components over %d features, %d images", summary["components"], dim, len(feats))
    return LatentDensity(as_tensor(means), as_tensor(factors), as_tensor(constants), summary)


def mixture_log_density(feats: Tensor, means: Tensor, precision_cholesky: Tensor, log_constant: Tensor) -> Tensor:
    """log q(f) (B,) float64 of (B, F) features under a ``LatentDensity``'s tensors; the artifact's
    ``latent_log_density`` compiles this same function. Elementwise products and sums over fixed axes, one column
    of diff @ U at a time (memory B x M x F), no matrix product: a row's value does not depend on the other rows of
    its batch."""
    diff = feats.unsqueeze(1) - means.unsqueeze(0)  # (B, M, F)
    squared = torch.zeros(diff.shape[0], diff.shape[1], dtype=diff.dtype, device=diff.device)
    for g in range(precision_cholesky.shape[2]):
        column = (diff * precision_cholesky[:, :, g].unsqueeze(0)).sum(dim=2)  # (B, M): (diff @ U)[..., g]
        squared = squared + column * column
    return torch.logsumexp(log_constant.unsqueeze(0) - 0.5 * squared, dim=1)


def log_density(density: LatentDensity, feats: Tensor) -> Tensor:
    """log q(f) (B,) float64 of (B, F) features."""
    return mixture_log_density(feats, density.means, density.precision_cholesky, density.log_constant)


__all__ = ["LatentDensity", "components_for", "encode_features", "features", "fit", "fit_split", "log_density",
           "mixture_log_density"]
