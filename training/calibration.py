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

A combined kind (``fisher-<compressor>``, ``density-<compressor>``, ``vae_artifact.combination``) also needs a
reference sample of normal images that is *not* the calibration sample: the val split, scored the same way
(``CalibrationImages``). A ``fisher-<compressor>-nn`` kind also tests the artifact's
``latent_neighbour_distance`` (its latent bank of training images), a ``density-<compressor>`` kind its
``latent_log_density`` (its latent density, ``training.density``); each is offered only by artifacts that have
what it needs.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from training.data import Dataset, to_8bit
from training.recipe import recorded_dataset
from vae_artifact import combination, complexity, noise
from vae_artifact.calibration import importance_stats
from vae_artifact.io import load_artifact, save_artifact
from vae_artifact.metadata import PREFERRED_KINDS, latent_outputs, preferred_kind

# The default kind and K, chosen from the measurements in docs/results.md (every protocol: Fashion-MNIST ->
# MNIST, and MNIST and Fashion-MNIST with each class held out). Without a latent density, or without a reference
# split, the default is the next of the contract's PREFERRED_KINDS that was computed.
DEFAULT_KIND = PREFERRED_KINDS[0]
DEFAULT_K = noise.DEFAULT_K
NOISE_SEED = 0  # the scoring noise seed recorded in the artifact; the service uses whatever it records
# Every kind and its compressor (None: the NLL itself). nll-minus-<c>: one statistic; fisher-<c>: combined.
KINDS: Dict[str, Optional[str]] = {"nll": None, **{f"nll-minus-{c}": c for c in complexity.COMPRESSORS},
                                   f"{combination.PREFIX}bz2": "bz2",
                                   f"{combination.PREFIX}bz2{combination.NN_SUFFIX}": "bz2",
                                   f"{combination.DENSITY_PREFIX}bz2": "bz2"}
REFERENCE = ("Serrà et al. 2020, Input complexity and out-of-distribution detection with likelihood-based "
             "generative models (ICLR)")
MAX_ROWS = 2048  # images x K per call of score(): bounds memory for any K

ScoreFn = Callable[[Tensor, Tensor], Tuple[Tensor, ...]]
LatentFns = Dict[str, Callable[[Tensor], Tensor]]  # output name -> an artifact's latent method (LATENT_STATISTICS)
is_combined = combination.is_combined


def describe_kind(kind: str) -> Dict:
    """The artifact's ``scoring.kinds[kind]``: formula, units, and the compressor's exact parameters (a combined
    kind's fitted references are added by ``calibration_sections``)."""
    compressor = KINDS[kind]
    if is_combined(kind):
        return combination.describe(kind)
    if compressor is None:
        return {"formula": "-log p(x): K-sample importance-weighted bound", "units": "nats", "complexity": None}
    return {"formula": f"-log p(x) - ln(2) * L(x), L(x) = {compressor} size of x in bits", "units": "nats",
            "complexity": complexity.describe(compressor), "reference": REFERENCE}


@torch.inference_mode()
def model_scores(score: ScoreFn, images: np.ndarray, *, k: int, noise_seed: int, latent_dim: int,
                 device: torch.device = torch.device("cpu"), latent: Optional[LatentFns] = None
                 ) -> Dict[str, np.ndarray]:
    """uint8 (N, C, H, W) -> per image nll, elbo, rec, kl (nats), se (nats) and ess, float64, from
    ``score(x, eps)`` called as the service calls it: x = u / 255 and the contract's noise for every row; and each
    ``latent`` method's output under its name (``latent_nn``, ``latent_log_density``)."""
    eps = noise.scoring_noise(k, latent_dim, noise_seed).to(device)
    step = max(1, MAX_ROWS // k)
    latent = latent or {}
    names = ("nll", "elbo", "rec", "kl", "se", "ess") + tuple(latent)
    parts: List[np.ndarray] = []
    for start in range(0, len(images), step):
        x = torch.from_numpy(images[start:start + step]).to(device).float().div_(255.0)
        iw, elbo, rec, kl, log_w = (t.double().cpu().numpy() for t in score(x, noise.for_rows(eps, x.shape[0])))
        stats = importance_stats(log_w.T)  # (K, B) -> (B, K): the service's SE and ESS
        columns = [-iw, elbo, rec, kl, stats["se"], stats["ess"]]
        columns += [method(x).double().cpu().numpy() for method in latent.values()]
        parts.append(np.stack(columns, axis=1))
    out = np.concatenate(parts) if parts else np.zeros((0, len(names)))
    return {name: out[:, i] for i, name in enumerate(names)}


def kind_scores(nll: np.ndarray, images: np.ndarray, levels: int, kinds: Sequence[str] = tuple(KINDS), *,
                combinations: Optional[Dict[str, combination.Combination]] = None, elbo: Optional[np.ndarray] = None,
                latent: Optional[Dict[str, np.ndarray]] = None) -> Tuple[Dict[str, np.ndarray], Dict[str, np.ndarray]]:
    """({kind: score (N,)}, {compressor: bits (N,)}) for the images whose NLLs (nats) are ``nll``. A combined
    kind is scored only with its fitted ``combinations[kind]``, the images' ``elbo`` and the ``latent`` outputs its
    terms need (``model_scores``' ``latent_nn``, ``latent_log_density``); left out without."""
    combinations = combinations if elbo is not None and combinations else {}
    latent = latent or {}
    kinds = [kind for kind in kinds if not is_combined(kind)
             or (kind in combinations and combinations[kind].latent_needs <= set(latent))]
    bits = {c: complexity.compressed_bits(images, c, levels) for c in {KINDS[k] for k in kinds} - {None}}
    scores = {kind: combinations[kind].scores(nll, elbo, bits[KINDS[kind]], latent) if is_combined(kind)
              else complexity.corrected(nll, bits.get(KINDS[kind])) for kind in kinds}
    return scores, bits


def fit_combinations(outputs: Dict[str, np.ndarray], images: np.ndarray, levels: int
                     ) -> Dict[str, combination.Combination]:
    """Every combined kind fitted on reference images (uint8, as served) with ``model_scores`` ``outputs``: those
    whose latent outputs (``combination.latent_needs``) the outputs have."""
    return {kind: combination.Combination.fit(kind, outputs["nll"], outputs["elbo"],
                                              complexity.compressed_bits(images, KINDS[kind], levels), outputs)
            for kind in KINDS if is_combined(kind) and combination.latent_needs(kind) <= set(outputs)}


def artifact_combinations(kinds: Dict[str, Dict]) -> Dict[str, combination.Combination]:
    """The fitted combined kinds of an artifact's ``scoring.kinds``."""
    return {kind: combination.Combination.from_dict(d["combination"]) for kind, d in kinds.items()
            if is_combined(kind) and d.get("combination") is not None}


def artifact_latent(module, meta) -> LatentFns:
    """The latent methods an artifact lists (it carries what they need), by output name."""
    return {output: getattr(module, method) for output, method in latent_outputs(meta).items()}


@dataclass(frozen=True)
class CalibrationImages:
    """The held-out normal images calibration scores, as a client sends them (uint8 (N, C, H, W), 8-bit):
    ``calib`` gives every kind's calibration scores, ``reference`` (the val split) the combined kinds'
    reference samples. Both never trained on; never the same rows (``vae_artifact.combination``)."""

    calib: np.ndarray
    reference: np.ndarray

    def __len__(self) -> int:  # images scored by ``calibration_sections``
        return len(self.calib) + len(self.reference)


def calibration_images(dataset: Dataset) -> CalibrationImages:
    """The calib and val splits as a client sends them: 8-bit, from the data's own levels; never binarised (see
    the module docstring)."""
    return CalibrationImages(to_8bit(dataset.calib.images, dataset.levels), to_8bit(dataset.val.images, dataset.levels))


def calibration_sections(score: ScoreFn, images: Union[CalibrationImages, np.ndarray], *, k: int, noise_seed: int,
                         latent_dim: int, levels: int, device: torch.device = torch.device("cpu"),
                         latent: Optional[LatentFns] = None) -> Tuple[Dict, Dict]:
    """The artifact's ``scoring`` and ``calibration`` sections from the held-out images (uint8, as served). A
    bare array is the calib split alone: the combined kinds, which need a reference sample, are left out; so
    are the kinds whose latent methods (``latent``: the artifact's, by output name) are not given."""
    calib, reference = (images.calib, images.reference) if isinstance(images, CalibrationImages) else (images, None)
    fit = dict(k=k, noise_seed=noise_seed, latent_dim=latent_dim, device=device, latent=latent)
    combinations = {}
    if reference is not None and len(reference):
        combinations = fit_combinations(model_scores(score, reference, **fit), reference, levels)
    out = model_scores(score, calib, **fit)
    scores, _ = kind_scores(out["nll"], calib, levels, combinations=combinations, elbo=out["elbo"], latent=out)
    descriptions = {kind: describe_kind(kind) for kind in scores}
    for kind, fitted in combinations.items():
        descriptions[kind]["combination"] = fitted.to_dict()
    default = preferred_kind(scores)
    scoring = {"k": k, "noise_seed": noise_seed, "noise": noise.DESCRIPTION, "default": default,
               "kinds": descriptions,
               "batch_invariant": True}  # training.export.ServingModule.score reduces over K per row
    calibration = {"split": "calib", "n": len(calib), "k": k,
                   "scores": {kind: sorted(float(v) for v in s) for kind, s in scores.items()}}
    return scoring, calibration


def recalibrate(model: Path, *, out: Optional[Path] = None, data: Optional[str] = None, k: Optional[int] = None,
                assume_defaults: bool = False, latent_bank: Optional[int] = None, latent_density: bool = False) -> Dict:
    """Recompute every kind's calibration of an artifact from its own calib split, with its own TorchScript
    ``score``, and write the artifact again (``out``, default in place). Returns the calibration section.
    The split is rebuilt from the artifact's data recipe (``training.recipe``); SystemExit, writing nothing,
    when that cannot be done exactly. ``data``: the same source at another location. ``latent_bank``: an
    artifact without a bank is first exported again, same weights, with one of that many training images;
    ``latent_density``: with a latent density fitted on its train split (``training.density``; fitted again if
    it has one), so that it offers the ``-nn`` and ``density-`` kinds (``training.export.with_latent_statistics``)."""
    module, meta = load_artifact(model)
    document = meta.to_dict()
    recorded = document.get("data") or {}
    try:
        dataset = recorded_dataset(recorded, data=data, assume_defaults=assume_defaults)
    except (ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"{model}: cannot recalibrate: {exc}") from exc
    new_bank = latent_bank if latent_bank and "latent_nn" not in artifact_latent(module, meta) else None
    if new_bank or latent_density:
        from training import export  # the model code loads only to export again

        module, document["methods"], fitted = export.with_latent_statistics(module, meta, dataset, bank=new_bank,
                                                                            density=latent_density)
        if fitted is not None:
            document["latent_density"] = fitted
    k = k or meta.scoring.k
    scoring, calibration = calibration_sections(
        module.score, calibration_images(dataset), k=k, noise_seed=meta.scoring.noise_seed,
        latent_dim=meta.latent_dim, levels=meta.levels, latent=artifact_latent(module, document))
    # A property of the module's TorchScript, which recalibration keeps: an older score reduces over K in a way
    # that depends on the call size, and the service must keep scoring it at one fixed size.
    scoring["batch_invariant"] = meta.scoring.batch_invariant
    save_artifact(module, Path(out or model), dict(document, scoring=scoring, calibration=calibration))
    load_artifact(Path(out or model))  # fails loudly if the rewritten artifact does not read back
    return calibration
