"""Conformal calibration of anomaly scores, and the statistics of the importance weights behind them.

Split conformal prediction: for n held-out normal scores s_i (the artifact's ``calibration.scores[kind]``)
and a new score s, p = (1 + #{s_i >= s}) / (n + 1) is a valid p-value when s is exchangeable with them, so
flagging p <= alpha has a false-positive rate of at most alpha on normal data. Exchangeable means computed
the same way: the same kind, the same K and the same noise (``vae_artifact.noise``). Training writes the
scores, the service and the evaluation read them; both use this one implementation. Numpy only.
"""

import math
from dataclasses import dataclass
from typing import Dict, Optional

import numpy as np

from vae_artifact.metadata import Metadata

TAILS = ("upper", "two-sided")


@dataclass(frozen=True)
class Calibration:
    scores: np.ndarray  # sorted ascending, nats
    k: int  # the K the scores were computed with

    @classmethod
    def from_metadata(cls, metadata: Metadata, kind: str = "nll") -> Optional["Calibration"]:
        """The calibration of ``kind`` in an artifact, or None when it has none."""
        section = metadata.calibration
        scores = None if section is None else section.scores.get(kind)
        if not scores:
            return None
        return cls(np.asarray(scores, dtype=np.float64), section.k)  # from_dict stored them sorted

    @classmethod
    def of(cls, scores: np.ndarray, k: int = 0) -> "Calibration":
        return cls(np.sort(np.asarray(scores, dtype=np.float64)), k)

    @property
    def n(self) -> int:
        return len(self.scores)

    def p_values(self, s: np.ndarray, tail: str = "upper") -> np.ndarray:
        """Conformal p-values; two-sided also flags scores that are too *low* (atypically likely inputs):
        min(1, 2 min(upper, lower))."""
        if tail not in TAILS:
            raise ValueError(f"tail must be one of {TAILS}, got {tail!r}")
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


def importance_stats(log_w: np.ndarray) -> Dict[str, np.ndarray]:
    """Standard error (delta method, nats) of log mean(w) and the effective sample size, per row of (N, K)."""
    log_w = np.asarray(log_w, dtype=np.float64)
    w = np.exp(log_w - log_w.max(axis=1, keepdims=True))  # rescaled: both statistics are scale-free
    k = log_w.shape[1]
    mean = w.mean(axis=1)
    se = w.std(axis=1, ddof=1) / (math.sqrt(k) * mean) if k > 1 else np.full(len(w), np.nan)
    ess = w.sum(axis=1) ** 2 / (w**2).sum(axis=1)
    return {"se": se, "ess": ess}
