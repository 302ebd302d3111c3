"""Anomaly scores from the artifact's ``score`` outputs, and their calibration into p-values.

The likelihood itself comes from the artifact; this module turns log-weights into an NLL with its Monte Carlo
standard error and effective sample size, combines it with model-free input complexity for the score kinds
that ask for it, and compares scores with the held-out normal scores stored in the artifact. The compressors,
the conformal p-values and the weight statistics are the contract's own (``vae_artifact``), the same code
that computed the calibration scores at training time.

Score kinds (``scoring.kinds`` in the artifact; every one in nats, higher = more anomalous): ``nll``,
``nll-minus-<compressor>`` = nll - ln 2 * compressed bits (Serrà et al. 2020), which stops simple inputs
(MNIST digits under a Fashion-MNIST model) from looking more normal than the training data, and the combined
kinds (``vae_artifact.combination``): ``fisher-<compressor>[-nn]``, which also flags inputs far simpler than
normal data, and ``density-<compressor>``, which asks where an image's encoding lands among the training
classes.
"""

import logging
import math
from dataclasses import dataclass
from typing import Dict, FrozenSet, List, Mapping, Optional, Sequence

import numpy as np

from service.core.codecs import InvalidInput
from vae_artifact import complexity
from vae_artifact.combination import Combination
from vae_artifact.calibration import Calibration, importance_stats
from vae_artifact.metadata import Metadata, preferred_kind

log = logging.getLogger(__name__)


class UnknownScoreKind(InvalidInput):
    code = "unknown_score"


@dataclass(frozen=True)
class ScoreKind:
    name: str
    compressor: Optional[str]  # None: the NLL itself; else nll - ln 2 * compressed bits, or combined with them
    calibration: Optional[Calibration]
    description: dict  # the artifact's scoring.kinds[name]
    combination: Optional[Combination] = None  # a combined kind's fitted terms

    @property
    def latent_needs(self) -> FrozenSet[str]:
        """The latent outputs its score needs of each image (``latent_nn``, ``latent_log_density``)."""
        return frozenset() if self.combination is None else self.combination.latent_needs

    def scores(self, nll: np.ndarray, elbo: np.ndarray, bits: Optional[np.ndarray],
               latent: Optional[Mapping[str, np.ndarray]] = None) -> np.ndarray:
        """This kind's scores (nats) of images with NLLs ``nll``, ELBOs ``elbo`` (nats, the same ``score`` call),
        this kind's compressed sizes ``bits`` and the ``latent`` outputs it needs (``latent_needs``)."""
        if self.combination is not None:
            return self.combination.scores(nll, elbo, bits, latent)
        return complexity.corrected(nll, bits)


@dataclass(frozen=True)
class ScoreKinds:
    """The score kinds an artifact offers, its default, and its pixel levels (what the compressors see)."""

    kinds: Dict[str, ScoreKind]
    default: str
    levels: int

    @classmethod
    def from_metadata(cls, metadata: Metadata, *, latent: FrozenSet[str] = frozenset()) -> "ScoreKinds":
        """Kinds from ``scoring.kinds`` (older artifacts: ``nll`` only). A kind whose compressor this service
        cannot reproduce exactly, or whose combination it cannot read, is left out with a warning: its calibration
        would not match its scores; so is a kind that needs a latent output the artifact does not compute
        (``latent``: those it does, ``ModelRuntime.latent_outputs``)."""
        kinds = {}
        for name, description in metadata.scoring.kinds.items():
            spec = description.get("complexity")
            if spec is not None and not complexity.supports(spec):
                log.warning("score kind %r needs compressor %r, which this service cannot reproduce; not offered",
                            name, spec)
                continue
            combined = None
            if description.get("combination") is not None:
                try:
                    combined = Combination.from_dict(description["combination"])
                except (ValueError, TypeError, KeyError) as exc:
                    log.warning("score kind %r: unreadable combination (%s); not offered", name, exc)
                    continue
                if spec is None or combined.compressor != spec["name"]:
                    log.warning("score kind %r: its combination's compressor is not its own; not offered", name)
                    continue
                if not combined.latent_needs <= latent:
                    log.warning("score kind %r needs the artifact's %s, which it lacks; not offered", name,
                                sorted(combined.latent_needs - latent))
                    continue
            kinds[name] = ScoreKind(name, spec["name"] if spec else None, Calibration.from_metadata(metadata, name),
                                    dict(description), combined)
        if "nll" not in kinds:
            kinds["nll"] = ScoreKind("nll", None, Calibration.from_metadata(metadata, "nll"), {"units": "nats"})
        default = metadata.scoring.default
        if default not in kinds:
            fallback = preferred_kind(kinds)
            log.warning("the artifact's default score %r is not available; using %s", default, fallback)
            default = fallback
        return cls(kinds, default, metadata.levels)

    def get(self, name: Optional[str]) -> ScoreKind:
        """The kind called ``name`` (None: the default); UnknownScoreKind (422) names the ones on offer."""
        kind = self.kinds.get(self.default if name is None else name)
        if kind is None:
            raise UnknownScoreKind(f"unknown score {name!r}; this model offers {sorted(self.kinds)}")
        return kind

    def complexity_bits(self, kind: ScoreKind, images: np.ndarray) -> Optional[np.ndarray]:
        """Compressed bits of uint8 (N, C, H, W) images for ``kind`` (None when it needs none). CPU-bound."""
        return None if kind.compressor is None else complexity.compressed_bits(images, kind.compressor, self.levels)


def applies(calibration: Optional[Calibration], k: int) -> bool:
    """Whether scores made with ``k`` importance samples may be compared with ``calibration``. The bound
    tightens with K (lower NLL on average), so scores at another K are not exchangeable with the calibration
    scores and their p-values would be biased (too high for K above the calibration's): none are given."""
    return calibration is not None and calibration.k == k


def score_rows(outputs: Dict[str, np.ndarray], *, num_dims: int, calibration: Optional[Calibration],
               alpha: float, tail: str, k: int, complexity_bits: Optional[np.ndarray] = None,
               kind: Optional[ScoreKind] = None) -> List[dict]:
    """One JSON-ready dict per image from the score kernel's outputs (made with ``k`` samples). The score is
    ``kind``'s (``ScoreKind.scores``) from the NLL and ``complexity_bits`` (the kind's compressed sizes); without
    ``kind``, nll - ln 2 * bits, or the NLL without bits. ``calibration`` must be the same kind's. p_value,
    percentile and is_anomaly are None unless it applies."""
    if not applies(calibration, k):
        calibration = None
    nll = -outputs["iw_ll"].astype(np.float64)
    latent_nn, log_density = outputs.get("latent_nn"), outputs.get("latent_log_density")
    score = (complexity.corrected(nll, complexity_bits) if kind is None
             else kind.scores(nll, outputs["elbo"], complexity_bits, outputs))
    stats = importance_stats(outputs["log_w"])
    to_bits = 1.0 / (num_dims * math.log(2.0))
    rows: List[dict] = []
    if calibration is not None:
        p = calibration.p_values(score, tail)
        pct = calibration.percentiles(score)
    for i in range(len(nll)):
        row = {
            "score_nats": float(score[i]),
            "complexity_bits": None if complexity_bits is None else float(complexity_bits[i]),
            "neighbour_distance": None if latent_nn is None else float(latent_nn[i]),
            "latent_density_nats": None if log_density is None else float(-log_density[i]),
            "nll_nats": float(nll[i]),
            "nll_bits_per_dim": float(nll[i] * to_bits),
            "nll_se_nats": _finite_or_none(stats["se"][i]),
            "ess": float(stats["ess"][i]),
            "elbo_nats": float(outputs["elbo"][i]),
            "reconstruction_nats": float(outputs["rec"][i]),
            "kl_nats": float(outputs["kl"][i]),
        }
        if calibration is not None:
            row.update(p_value=float(p[i]), percentile=float(pct[i]), is_anomaly=bool(p[i] <= alpha))
        else:
            row.update(p_value=None, percentile=None, is_anomaly=None)
        rows.append(row)
    return rows


def calibration_summary(calibration: Optional[Calibration], alpha: float, tail: str, k: int) -> dict:
    """The thresholds behind is_anomaly: score > threshold_nats, or (two-sided) score < threshold_low_nats.
    Uncalibrated (no calibration, or ``k`` is not its K): no thresholds; n and k still describe the calibration,
    so a client learns which K would get p-values."""
    summary = {"calibrated": applies(calibration, k), "n": 0 if calibration is None else calibration.n,
               "k": None if calibration is None else calibration.k, "alpha": alpha, "tail": tail,
               "threshold_nats": None, "threshold_low_nats": None}
    if not summary["calibrated"]:
        return summary
    if tail == "upper":
        threshold, low = calibration.threshold(alpha), None
    else:  # p = min(1, 2 min(upper, lower)) <= alpha exactly when one tail's p-value is <= alpha / 2
        threshold, low = calibration.threshold(alpha / 2), calibration.lower_threshold(alpha / 2)
    summary.update(threshold_nats=threshold if threshold is None or math.isfinite(threshold) else None,
                   threshold_low_nats=low if low is None or math.isfinite(low) else None)
    return summary


def _finite_or_none(value: float) -> Optional[float]:
    return float(value) if np.isfinite(value) else None


__all__: Sequence[str] = ("Calibration", "ScoreKind", "ScoreKinds", "UnknownScoreKind", "applies",
                          "score_rows", "calibration_summary")
