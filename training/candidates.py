"""Anomaly detectors measured beside the served score kinds, and not served: the candidates the protocols compare
the kinds with (``python -m training ood protocols --candidates``), so that a kind kept or dropped is kept or
dropped on numbers this command reproduces.

Every candidate is computed from the artifact's own weights, on 8-bit images as served, and fitted on the train
split its data recipe rebuilds (labels included; never a test image):

- ``knn-<k>``: the mean Euclidean distance from the posterior mean to its k nearest training posterior means
  (Sun et al. 2022 use k > 1 on normalised features);
- ``mahalanobis``: the smallest Mahalanobis distance of the posterior mean to a class mean under one covariance
  shared by the classes (Lee et al. 2018, on the encoder's output);
- ``gaussian-class``: the smallest -log N(mu; class mean, class covariance) over the classes: one Gaussian a
  class, each with its own covariance;
- ``density-means``: the ``density-<c>`` kinds' latent density fitted on the posterior means alone, without the
  mean log-variance (what that feature adds);
- ``density-unlabelled``: the latent density fitted without the labels (one class);
- ``rapp-sap``, ``rapp-nap``: RaPP (Kim et al. 2020): the encoder's hidden activations of x and of its
  reconstruction (the decoder's mean at x's posterior mean), differenced layer by layer; SAP sums their squares,
  NAP first whitens them with the SVD of the training images' differences.
"""

import math
from typing import Dict, List, Tuple

import numpy as np
import torch
from torch import nn

from training import density
from training.data import Dataset, to_8bit
from training.export import eager_vae  # its hidden layers are what RaPP reads
from training.model import VAE

ROWS = 500  # images per forward pass
RAPP_TRAIN = 5000  # training images whose pathway differences fit NAP's SVD
KNN = (1, 5, 20)


@torch.inference_mode()
def posteriors(vae: VAE, images: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """uint8 images -> posterior means and log-variances (float64), as the artifact's ``encode`` computes them."""
    mus, logvars = [], []
    for start in range(0, len(images), ROWS):
        x = vae.quantize(torch.from_numpy(images[start:start + ROWS]).float() / 255)
        mu, logvar = vae.encode(x)
        mus.append(mu.double().numpy())
        logvars.append(logvar.double().numpy())
    return np.concatenate(mus), np.concatenate(logvars)


@torch.inference_mode()
def pathway_differences(vae: VAE, images: np.ndarray) -> np.ndarray:
    """RaPP's differences: every activation of the encoder (each SiLU's output and the posterior mean) for x minus
    the same for its reconstruction, flattened and concatenated, float32 (N, H)."""
    activations: List[torch.Tensor] = []
    hooks = [layer.register_forward_hook(lambda _m, _i, out: activations.append(out.flatten(1)))
             for layer in vae.encoder.modules() if isinstance(layer, nn.SiLU)]
    parts = []
    try:
        for start in range(0, len(images), ROWS):
            x = vae.quantize(torch.from_numpy(images[start:start + ROWS]).float() / 255)
            activations.clear()
            mu = vae.encode(x)[0]
            path_x = activations[:] + [mu]
            activations.clear()
            mu_r = vae.encode(vae.decode(mu))[0]  # the reconstruction, fed back as it is (RaPP)
            path_r = activations[:] + [mu_r]
            parts.append(torch.cat([a - b for a, b in zip(path_x, path_r)], dim=1).numpy())
    finally:
        for hook in hooks:
            hook.remove()
    return np.concatenate(parts)


def knn_distances(query: np.ndarray, bank: np.ndarray, ks=KNN, rows: int = 256) -> Dict[int, np.ndarray]:
    """Mean distance to the k nearest rows of ``bank``, for each k."""
    out = {k: np.empty(len(query)) for k in ks}
    bank_sq = (bank ** 2).sum(axis=1)
    for start in range(0, len(query), rows):
        q = query[start:start + rows]
        d2 = (q ** 2).sum(axis=1)[:, None] + bank_sq[None] - 2.0 * q @ bank.T
        top = max(ks)
        nearest = np.sort(np.partition(np.maximum(d2, 0.0), top - 1, axis=1)[:, :top], axis=1) ** 0.5
        for k in ks:
            out[k][start:start + rows] = nearest[:, :k].mean(axis=1)
    return out


def class_gaussians(train: np.ndarray, labels: np.ndarray, query: np.ndarray) -> Dict[str, np.ndarray]:
    """``mahalanobis`` (shared covariance) and ``gaussian-class`` (one covariance a class), smallest over classes."""
    classes = np.unique(labels)
    means = np.stack([train[labels == c].mean(axis=0) for c in classes])
    dim = train.shape[1]
    centred = train - means[np.searchsorted(classes, labels)]
    shared = np.linalg.inv(np.cov(centred.T) + 1e-6 * np.eye(dim))
    tied, own = [], []
    for c, m in zip(classes, means):
        d = query - m
        tied.append(np.einsum("nd,de,ne->n", d, shared, d))
        cov = np.cov(train[labels == c].T) + 1e-6 * np.eye(dim)
        _, log_det = np.linalg.slogdet(cov)
        own.append(0.5 * (np.einsum("nd,de,ne->n", d, np.linalg.inv(cov), d) + log_det + dim * math.log(2 * math.pi)))
    return {"mahalanobis": np.min(tied, axis=0), "gaussian-class": np.min(own, axis=0)}


def rapp(train: np.ndarray, query: np.ndarray) -> Dict[str, np.ndarray]:
    """SAP and NAP of ``query`` differences, NAP whitened by the SVD of the ``train`` differences."""
    mean = train.mean(axis=0)
    _, s, vt = np.linalg.svd(train - mean, full_matrices=False)
    keep = s > s[0] * 1e-6
    projected = (query - mean) @ vt[keep].T / (s[keep] / math.sqrt(len(train)))
    return {"rapp-sap": (query.astype(np.float64) ** 2).sum(axis=1), "rapp-nap": (projected ** 2).sum(axis=1)}


def candidate_scores(module, meta, dataset: Dataset, normal: np.ndarray, ood: np.ndarray, seed: int = 0
                     ) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    """Every candidate's scores (higher = stranger) of the ``normal`` and ``ood`` uint8 test images, fitted on
    ``dataset``'s train split (the artifact's recorded one)."""
    vae = eager_vae(module, meta)
    train_images = to_8bit(dataset.train.images, dataset.levels)
    labels = dataset.train.labels
    mu_train, logvar_train = posteriors(vae, train_images)
    queried = [posteriors(vae, images) for images in (normal, ood)]
    scores: Dict[str, List[np.ndarray]] = {}
    feats_train = np.c_[mu_train, logvar_train.mean(axis=1)]
    means_only = density.fit(mu_train, labels, seed=seed)
    unlabelled = density.fit(feats_train, None, seed=seed)
    labelled = len(np.unique(labels)) >= 2 and (labels >= 0).all()
    for mu, logvar in queried:
        for k, values in knn_distances(mu, mu_train).items():
            scores.setdefault(f"knn-{k}", []).append(values)
        if labelled:
            for name, values in class_gaussians(mu_train, labels, mu).items():
                scores.setdefault(name, []).append(values)
        for name, fitted, feats in (("density-means", means_only, mu),
                                    ("density-unlabelled", unlabelled, np.c_[mu, logvar.mean(axis=1)])):
            scores.setdefault(name, []).append(-density.log_density(fitted, torch.from_numpy(feats)).numpy())
    picks = np.random.default_rng(seed).choice(len(train_images), size=min(RAPP_TRAIN, len(train_images)),
                                               replace=False)
    rapp_train = pathway_differences(vae, train_images[np.sort(picks)])
    for images in (normal, ood):
        for name, values in rapp(rapp_train, pathway_differences(vae, images)).items():
            scores.setdefault(name, []).append(values)
    return {name: (pair[0], pair[1]) for name, pair in scores.items()}


__all__ = ["KNN", "candidate_scores", "class_gaussians", "knn_distances", "pathway_differences", "posteriors", "rapp"]
