"""Anomaly scores from the artifact's ``score`` outputs, and their calibration into p-values.

The likelihood itself comes from the artifact; this module only turns log-weights into an NLL with its
Monte Carlo standard error and effective sample size, and compares scores with the held-out normal
scores stored in the artifact (split conformal prediction): for n calibration scores s_i and a new
score s, p = (1 + #{s_i >= s}) / (n + 1) is a valid p-value when s is exchangeable with them, so flagging
p <= alpha has a false-positive rate of at most alpha on normal data.
"""

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np

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
               alpha: float, tail: str, k: int) -> List[dict]:
    """One JSON-ready dict per image from the score kernel's outputs."""
    nll = -outputs["iw_ll"].astype(np.float64)
    stats = importance_stats(outputs["log_w"])
    to_bits = 1.0 / (num_dims * math.log(2.0))
    rows: List[dict] = []
    if calibration is not None:
        p = calibration.p_values(nll, tail)
        pct = calibration.percentiles(nll)
    for i in range(len(nll)):
        row = {
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
    if calibration is None:
        return {"calibrated": False, "n": 0, "k": None, "alpha": alpha, "tail": tail, "threshold_nats": None}
    threshold = calibration.threshold(alpha) if tail == "upper" else None
    return {
        # p-values are exact only for scores computed like the calibration ones, i.e. with the same K.
        "calibrated": k == calibration.k,
        "n": calibration.n,
        "k": calibration.k,
        "alpha": alpha,
        "tail": tail,
        "threshold_nats": threshold if threshold is None or math.isfinite(threshold) else None,
    }


def _finite_or_none(value: float) -> Optional[float]:
    return float(value) if np.isfinite(value) else None


def check_alpha(alpha: float) -> None:
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")


__all__: Sequence[str] = ("Calibration", "importance_stats", "score_rows", "calibration_summary", "TAILS")
