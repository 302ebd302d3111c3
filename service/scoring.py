"""Anomaly scores from the artifact's ``score`` outputs, and their calibration into p-values.

The likelihood itself comes from the artifact; this module only turns log-weights into an NLL with its
Monte Carlo standard error and effective sample size, combines it with model-free input complexity for
the score kinds that ask for it, and compares scores with the held-out normal scores stored in the
artifact (split conformal prediction): for n calibration scores s_i and a new score s,
p = (1 + #{s_i >= s}) / (n + 1) is a valid p-value when s is exchangeable with them, so flagging
p <= alpha has a false-positive rate of at most alpha on normal data.

Score kinds (``scoring.kinds`` in the artifact; every one in nats, higher = more anomalous): ``nll``, and
``nll-minus-<compressor>`` = nll - ln 2 * compressed bits (Serrà et al. 2020), which stops simple inputs
(MNIST digits under a Fashion-MNIST model) from looking more normal than the training data.
"""

import logging
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np

from service import complexity
from service.codecs import InvalidInput

log = logging.getLogger(__name__)

TAILS = ("upper", "two-sided")


@dataclass(frozen=True)
class Calibration:
    scores: np.ndarray  # sorted ascending, nats
    k: int  # the K the scores were computed with

    @classmethod
    def from_metadata(cls, metadata: dict, kind: str = "nll") -> Optional["Calibration"]:
        cal = metadata.get("calibration") or {}
        scores = (cal.get("scores") or {}).get(kind)
        if not scores:
            return None
        return cls(np.sort(np.asarray(scores, dtype=np.float64)), int(cal.get("k", 0)))

    @property
    def n(self) -> int:
        return len(self.scores)

    def p_values(self, s: np.ndarray, tail: str = "upper") -> np.ndarray:
        """Conformal p-values; two-sided also flags scores that are too *low* (atypically likely inputs)."""
        n = self.n
        upper = (1.0 + n - np.searchsorted(self.scores, s, side="left")) / (n + 1.0)  # #{s_i >= s}
        if tail == "upper":
            return upper
        lower = (1.0 + np.searchsorted(self.scores, s, side="right")) / (n + 1.0)  # #{s_i <= s}
        return np.minimum(1.0, 2.0 * np.minimum(upper, lower))

    def percentiles(self, s: np.ndarray) -> np.ndarray:
        """Share of calibration scores strictly below s, in percent."""
        return 100.0 * np.searchsorted(self.scores, s, side="left") / self.n

    def threshold(self, alpha: float) -> Optional[float]:
        """Upper-tail threshold t: p(s) <= alpha exactly when s > t. None if n is too small for alpha."""
        m = math.floor(alpha * (self.n + 1) + 1e-9) - 1  # most calibration scores allowed at or above s
        if m < 0:
            return None
        return float(self.scores[self.n - m - 1]) if m < self.n else -math.inf

    def lower_threshold(self, alpha: float) -> Optional[float]:
        """Lower-tail threshold t: (1 + #{s_i <= s}) / (n + 1) <= alpha exactly when s < t. None if n is too small."""
        m = math.floor(alpha * (self.n + 1) + 1e-9) - 1  # most calibration scores allowed at or below s
        if m < 0:
            return None
        return float(self.scores[m]) if m < self.n else math.inf


class UnknownScoreKind(InvalidInput):
    code = "unknown_score"


@dataclass(frozen=True)
class ScoreKind:
    name: str
    compressor: Optional[str]  # None: the NLL itself; else nll - ln 2 * compressed bits
    calibration: Optional[Calibration]
    description: dict  # the artifact's scoring.kinds[name]


@dataclass(frozen=True)
class ScoreKinds:
    """The score kinds an artifact offers, its default, and its pixel levels (what the compressors see)."""

    kinds: Dict[str, ScoreKind]
    default: str
    levels: int

    @classmethod
    def from_metadata(cls, metadata: dict) -> "ScoreKinds":
        """Kinds from ``scoring.kinds`` (older artifacts: ``nll`` only). A kind whose compressor this service
        cannot reproduce exactly is left out with a warning: its calibration would not match its scores."""
        scoring = metadata.get("scoring") or {}
        described = scoring.get("kinds") or {"nll": {"units": "nats", "complexity": None}}
        kinds = {}
        for name, description in described.items():
            spec = (description or {}).get("complexity")
            if spec is not None and not complexity.supports(spec):
                log.warning("score kind %r needs compressor %r, which this service cannot reproduce; not offered",
                            name, spec)
                continue
            kinds[name] = ScoreKind(name, spec["name"] if spec else None, Calibration.from_metadata(metadata, name),
                                    dict(description or {}))
        if "nll" not in kinds:
            kinds["nll"] = ScoreKind("nll", None, Calibration.from_metadata(metadata, "nll"), {"units": "nats"})
        default = scoring.get("default", "nll")
        if default not in kinds:
            log.warning("the artifact's default score %r is not available; using nll", default)
            default = "nll"
        levels = int((metadata.get("pixels") or {}).get("levels", 256))
        return cls(kinds, default, levels)

    def get(self, name: Optional[str]) -> ScoreKind:
        """The kind called ``name`` (None: the default); UnknownScoreKind (422) names the ones on offer."""
        kind = self.kinds.get(self.default if name is None else name)
        if kind is None:
            raise UnknownScoreKind(f"unknown score {name!r}; this model offers {sorted(self.kinds)}")
        return kind

    def complexity_bits(self, kind: ScoreKind, images: np.ndarray) -> Optional[np.ndarray]:
        """Compressed bits of uint8 (N, C, H, W) images for ``kind`` (None when it needs none). CPU-bound."""
        return None if kind.compressor is None else complexity.compressed_bits(images, kind.compressor, self.levels)


def importance_stats(log_w: np.ndarray) -> Dict[str, np.ndarray]:
    """Standard error (delta method, nats) of log mean(w) and the effective sample size, per row of (N, K)."""
    log_w = log_w.astype(np.float64)
    w = np.exp(log_w - log_w.max(axis=1, keepdims=True))  # rescaled: both statistics are scale-free
    k = log_w.shape[1]
    mean = w.mean(axis=1)
    se = w.std(axis=1, ddof=1) / (math.sqrt(k) * mean) if k > 1 else np.full(len(w), np.nan)
    ess = w.sum(axis=1) ** 2 / (w**2).sum(axis=1)
    return {"se": se, "ess": ess}


def score_rows(outputs: Dict[str, np.ndarray], *, num_dims: int, calibration: Optional[Calibration],
               alpha: float, tail: str, k: int, complexity_bits: Optional[np.ndarray] = None) -> List[dict]:
    """One JSON-ready dict per image from the score kernel's outputs. With ``complexity_bits`` (the kind's
    compressed sizes) the score is nll - ln 2 * bits, else the NLL; ``calibration`` must be the same kind's."""
    nll = -outputs["iw_ll"].astype(np.float64)
    score = nll if complexity_bits is None else nll - math.log(2.0) * complexity_bits
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
    """The thresholds behind is_anomaly: score > threshold_nats, or (two-sided) score < threshold_low_nats."""
    if calibration is None:
        return {"calibrated": False, "n": 0, "k": None, "alpha": alpha, "tail": tail, "threshold_nats": None,
                "threshold_low_nats": None}
    if tail == "upper":
        threshold, low = calibration.threshold(alpha), None
    else:  # p = min(1, 2 min(upper, lower)) <= alpha exactly when one tail's p-value is <= alpha / 2
        threshold, low = calibration.threshold(alpha / 2), calibration.lower_threshold(alpha / 2)
    return {
        # p-values are exact only for scores computed like the calibration ones, i.e. with the same K.
        "calibrated": k == calibration.k,
        "n": calibration.n,
        "k": calibration.k,
        "alpha": alpha,
        "tail": tail,
        "threshold_nats": threshold if threshold is None or math.isfinite(threshold) else None,
        "threshold_low_nats": low if low is None or math.isfinite(low) else None,
    }


def _finite_or_none(value: float) -> Optional[float]:
    return float(value) if np.isfinite(value) else None


def check_alpha(alpha: float) -> None:
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")


__all__: Sequence[str] = ("Calibration", "ScoreKind", "ScoreKinds", "UnknownScoreKind", "importance_stats",
                          "score_rows", "calibration_summary", "TAILS")
