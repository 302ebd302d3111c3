"""Anomaly score kinds and the artifact's ``scoring`` and ``calibration`` sections.

Score kinds (every one in nats, higher = more anomalous; the artifact lists them in ``scoring.kinds``):

- ``nll``: -log p(x), the K-sample importance-weighted bound of the exported ``score`` method. Famously
  fooled by simple inputs: a Fashion-MNIST model finds MNIST digits *more* likely than its own test data.
- ``nll-minus-<compressor>``: -log p(x) - ln 2 * L(x), with L(x) the lossless compressed size of x in bits
  (Serrà et al. 2020, "Input complexity and out-of-distribution detection with likelihood-based generative
  models"). The compressor is a generic model of images, so the difference is a log-likelihood ratio: how
  much *worse* the VAE explains x than a model of "any image" does. Simple images stop looking typical.

Calibration (``calibration.scores[kind]``) holds every kind's scores of the held-out calib split, computed
exactly as the service computes them: 8-bit images, x = u / 255, the artifact's ``score`` with the contract's
noise (``vae_artifact.noise``) shared by every row, and the contract's compressors. ``recalibrate`` rewrites
those sections of an existing artifact from the TorchScript module itself.

A binarised (Bernoulli) model is calibrated on the same 8-bit images as any other: the service gets 8-bit
images and the model snaps them to {0, 1} at 0.5 itself, so scores of a random Bernoulli binarisation (the
test metrics' dynamic binarisation, ``data.held_out_splits``) are not exchangeable with served scores.
"""

from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from training.data import Dataset, to_8bit
from training.recipe import recorded_dataset
from vae_artifact import complexity, noise
from vae_artifact.calibration import importance_stats
from vae_artifact.io import load_artifact, save_artifact

# The default kind and K, chosen from the measurements in docs/anomaly.md (Fashion-MNIST -> MNIST).
DEFAULT_KIND = "nll-minus-bz2"
DEFAULT_K = noise.DEFAULT_K
NOISE_SEED = 0  # the scoring noise seed recorded in the artifact; the service uses whatever it records
KINDS: Dict[str, Optional[str]] = {"nll": None, **{f"nll-minus-{c}": c for c in complexity.COMPRESSORS}}
REFERENCE = ("Serrà et al. 2020, Input complexity and out-of-distribution detection with likelihood-based "
             "generative models (ICLR)")
MAX_ROWS = 2048  # images x K per call of score(): bounds memory for any K

ScoreFn = Callable[[Tensor, Tensor], Tuple[Tensor, ...]]


def describe_kind(kind: str) -> Dict:
    """The artifact's ``scoring.kinds[kind]``: formula, units, and the compressor's exact parameters."""
    compressor = KINDS[kind]
    if compressor is None:
        return {"formula": "-log p(x): K-sample importance-weighted bound", "units": "nats", "complexity": None}
    return {"formula": f"-log p(x) - ln(2) * L(x), L(x) = {compressor} size of x in bits", "units": "nats",
            "complexity": complexity.describe(compressor), "reference": REFERENCE}


@torch.inference_mode()
def model_scores(score: ScoreFn, images: np.ndarray, *, k: int, noise_seed: int, latent_dim: int,
                 device: torch.device = torch.device("cpu")) -> Dict[str, np.ndarray]:
    """uint8 (N, C, H, W) -> per image nll, elbo, rec, kl (nats), se (nats) and ess, float64, from
    ``score(x, eps)`` called as the service calls it: x = u / 255 and the contract's noise for every row."""
    eps = noise.scoring_noise(k, latent_dim, noise_seed).to(device)
    step = max(1, MAX_ROWS // k)
    parts: List[np.ndarray] = []
    for start in range(0, len(images), step):
        x = torch.from_numpy(images[start:start + step]).to(device).float().div_(255.0)
        iw, elbo, rec, kl, log_w = (t.double().cpu().numpy() for t in score(x, noise.for_rows(eps, x.shape[0])))
        stats = importance_stats(log_w.T)  # (K, B) -> (B, K): the service's SE and ESS
        parts.append(np.stack([-iw, elbo, rec, kl, stats["se"], stats["ess"]], axis=1))
    out = np.concatenate(parts) if parts else np.zeros((0, 6))
    return {name: out[:, i] for i, name in enumerate(("nll", "elbo", "rec", "kl", "se", "ess"))}


def kind_scores(nll: np.ndarray, images: np.ndarray, levels: int,
                kinds: Sequence[str] = tuple(KINDS)) -> Tuple[Dict[str, np.ndarray], Dict[str, np.ndarray]]:
    """({kind: score (N,)}, {compressor: bits (N,)}) for the images whose NLLs (nats) are ``nll``."""
    bits = {c: complexity.compressed_bits(images, c, levels) for c in {KINDS[k] for k in kinds} - {None}}
    scores = {kind: complexity.corrected(nll, bits.get(KINDS[kind])) for kind in kinds}
    return scores, bits


def calibration_images(dataset: Dataset) -> np.ndarray:
    """The calib split as a client sends it: uint8 (N, C, H, W), 8-bit, from the data's own levels; never
    binarised (see the module docstring)."""
    return to_8bit(dataset.calib.images, dataset.levels)


def calibration_sections(score: ScoreFn, calib_images: np.ndarray, *, k: int, noise_seed: int, latent_dim: int,
                         levels: int, device: torch.device = torch.device("cpu")) -> Tuple[Dict, Dict]:
    """The artifact's ``scoring`` and ``calibration`` sections from the calib split (uint8, as served)."""
    nll = model_scores(score, calib_images, k=k, noise_seed=noise_seed, latent_dim=latent_dim, device=device)["nll"]
    scores, _ = kind_scores(nll, calib_images, levels)
    scoring = {"k": k, "noise_seed": noise_seed, "noise": noise.DESCRIPTION, "default": DEFAULT_KIND,
               "kinds": {kind: describe_kind(kind) for kind in KINDS},
               "batch_invariant": True}  # training.export.ServingModule.score reduces over K per row
    calibration = {"split": "calib", "n": len(calib_images), "k": k,
                   "scores": {kind: sorted(float(v) for v in s) for kind, s in scores.items()}}
    return scoring, calibration


def recalibrate(model: Path, *, out: Optional[Path] = None, data: Optional[str] = None, k: Optional[int] = None,
                assume_defaults: bool = False) -> Dict:
    """Recompute every kind's calibration of an artifact from its own calib split, with its own TorchScript
    ``score``, and write the artifact again (``out``, default in place). Returns the calibration section.
    The split is rebuilt from the artifact's data recipe (``training.recipe``); SystemExit, writing nothing,
    when that cannot be done exactly. ``data``: the same source at another location."""
    module, meta = load_artifact(model)
    document = meta.to_dict()
    recorded = document.get("data") or {}
    try:
        dataset = recorded_dataset(recorded, data=data, assume_defaults=assume_defaults)
    except (ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"{model}: cannot recalibrate: {exc}") from exc
    k = k or meta.scoring.k
    scoring, calibration = calibration_sections(
        module.score, calibration_images(dataset), k=k, noise_seed=meta.scoring.noise_seed,
        latent_dim=meta.latent_dim, levels=meta.levels)
    # A property of the module's TorchScript, which recalibration keeps: an older score reduces over K in a way
    # that depends on the call size, and the service must keep scoring it at one fixed size.
    scoring["batch_invariant"] = meta.scoring.batch_invariant
    save_artifact(module, Path(out or model), dict(document, scoring=scoring, calibration=calibration))
    load_artifact(Path(out or model))  # fails loudly if the rewritten artifact does not read back
    return calibration

