"""Combined anomaly scores: several per-image statistics, each a p-value against normal images, in one score.

A kind ``fisher-<compressor>`` asks three questions of an image, all answered by the one ``score`` call and the
compressor, and combines the answers with Fisher's method (Fisher 1932, *Statistical Methods for Research
Workers*, §21.1): -sum_i ln p_i. Each p_i is a conformal p-value of one statistic against a **reference** sample
of normal images (the artifact stores the sorted reference values, the val split's, computed exactly as the
service computes them):

- ``nll-minus-<c>``, upper tail: the model explains x worse than a generic compressor does, relative to normal
  images (Serrà et al. 2020): inputs unlike the training data that are not simpler than it;
- ``bits-<c>``, lower tail: x is simpler than normal images (a typicality test on input complexity, after
  Nalisnick et al. 2019), the blind spot of likelihoods: a model prefers simple inputs (a held-out MNIST "1"
  has a lower NLL than the digits it was trained on). Only the lower tail: the upper one, inputs more complex
  than normal, is already the first question's (the model explains noise far worse than bz2 does);
- ``iw-gap``, upper tail: log p(x) (the K-sample bound) minus the ELBO, both from the same K samples: how much
  the importance samples improve on the encoder's own posterior. The encoder was fitted to normal images; on
  others its posterior is a worse fit and the gap grows. A free stand-in for likelihood regret (Xiao et al.
  2020), which re-fits the encoder per input (tens of extra model calls per image).

The kind ``fisher-<compressor>-nn`` asks a fourth question, of the latent space:

- ``latent-nn``, upper tail: the Euclidean distance from x's posterior mean to the nearest posterior mean of
  the artifact's bank of training images (its ``latent_neighbour_distance`` method). The three questions above
  are about how well x is explained; this one is about *what* x is: a digit the model has never seen may be
  explained about as well as the ones it has (MNIST with a 4 held out: the likelihood terms reach AUROC 0.79),
  yet land where no training image does (distance alone: 0.87). A nearest-neighbour distance in a learned
  representation is the classic detector of this kind (e.g. Sun et al. 2022, *Out-of-distribution detection
  with deep nearest neighbors*).

The combined score is one more statistic: its own conformal calibration (the calib split, the same K and
noise) gives its p-values. The reference sample must not be the calibration sample: fitted and calibrated on
the same rows, the scores of those rows are not exchangeable with fresh ones (each row counts itself in its own
reference p-values) and the false-positive guarantee is lost. Training uses the val split, which neither trains
the weights nor calibrates. Fisher's sum needs no independence between the p-values here: the combined score
is calibrated as a whole, so dependence only changes power, never validity.

Past the reference's extreme a count stops at 1/(m + 1): every input beyond it, a little or a thousand nats,
would get the same p-value, and the combined score would top out at a few times ln(m + 1). With a small
reference (the bundled digits: m = 144) that cap sits below what the most unusual calibration images reach, and
pure noise could never be flagged at alpha = 0.01 (every noise image got the same p-value, above it). So beyond the
extreme a term continues as an exponential tail (``beyond = "exponential"``, every new artifact):
p = 1/(m + 1) exp(-excess / s), where s is the mean excess of the reference's most extreme tenth over the value
just inside it (peaks over a threshold with a generalised Pareto tail of shape 0; Pickands 1975). Inside the
reference nothing changes; any monotone extension keeps the combined score valid, since it is calibrated as a
whole. Artifacts written before it say nothing and keep the counts (``beyond = "counts"``), so their stored
calibration stays the scores the service computes.

Row by row and exact: a reference p-value is a count (``searchsorted``) turned into a rational, its logarithm
is ``math.log`` of one number, a tail adds one division, and the sum has a fixed order, so a row's score does
not depend on the other rows of its batch. Numpy only.
"""

import math
from dataclasses import dataclass, field
from typing import Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

from vae_artifact import complexity

TAILS = ("upper", "lower", "two-sided")
BEYOND = ("counts", "exponential")  # past the reference's extreme: stop at 1/(m + 1), or continue (docstring)
PREFIX = "fisher-"  # kind names: fisher-<compressor>
REFERENCE = ("Fisher 1932 (combining p-values, -sum ln p); Serrà et al. 2020 (input complexity); Nalisnick et al. "
             "2019 (typicality); Xiao et al. 2020 (likelihood regret: the encoder's fit to the input)")
NN_REFERENCE = "; Sun et al. 2022 (nearest neighbours in a learned representation)"


NEIGHBOURS = "latent-nn"  # the statistic of the artifact's latent_neighbour_distance
NN_SUFFIX = "-nn"  # kind fisher-<compressor>-nn: the three terms and latent-nn


def statistics(nll: np.ndarray, elbo: np.ndarray, bits: Optional[np.ndarray], compressor: Optional[str],
               latent_nn: Optional[np.ndarray] = None) -> Dict[str, np.ndarray]:
    """The per-image statistics a term may test, float64 (N,), from the NLL and ELBO (nats) of one ``score``
    call: ``nll``, ``iw-gap`` = -nll - elbo (nats, >= 0), with a compressor's ``bits`` also ``bits-<c>``
    (bits) and ``nll-minus-<c>`` (nats, the complexity-corrected NLL), and with ``latent_nn`` (the artifact's
    ``latent_neighbour_distance``) ``latent-nn``."""
    nll, elbo = np.asarray(nll, dtype=np.float64), np.asarray(elbo, dtype=np.float64)
    stats = {"nll": nll, "iw-gap": -nll - elbo}
    if bits is not None:
        bits = np.asarray(bits, dtype=np.float64)
        stats[f"bits-{compressor}"] = bits
        stats[f"nll-minus-{compressor}"] = complexity.corrected(nll, bits)
    if latent_nn is not None:
        stats[NEIGHBOURS] = np.asarray(latent_nn, dtype=np.float64)
    return stats


def recipe(compressor: str, neighbours: bool = False) -> Tuple[Tuple[str, str], ...]:
    """The (statistic, tail) terms of kind ``fisher-<compressor>``, or with ``neighbours`` of
    ``fisher-<compressor>-nn`` (the module docstring says why)."""
    terms = ((f"nll-minus-{compressor}", "upper"), (f"bits-{compressor}", "lower"), ("iw-gap", "upper"))
    return terms + ((NEIGHBOURS, "upper"),) if neighbours else terms


def reference_p_values(reference: np.ndarray, values: np.ndarray, tail: str) -> np.ndarray:
    """(1 + #{r >= v}) / (m + 1) (upper), (1 + #{r <= v}) / (m + 1) (lower), or min(1, 2 min(upper, lower))
    for each value against the sorted ``reference`` of m normal values."""
    if tail not in TAILS:
        raise ValueError(f"tail must be one of {TAILS}, got {tail!r}")
    m = len(reference)
    upper = (1.0 + m - np.searchsorted(reference, values, side="left")) / (m + 1.0)
    if tail == "upper":
        return upper
    lower = (1.0 + np.searchsorted(reference, values, side="right")) / (m + 1.0)
    return lower if tail == "lower" else np.minimum(1.0, 2.0 * np.minimum(upper, lower))


def tail_scale(reference: np.ndarray, side: str) -> float:
    """The scale s of the exponential tail past the sorted ``reference``'s extreme on ``side`` (upper or lower):
    the mean excess of its most extreme tenth (at least one value) over the value just inside them; the
    reference's standard deviation where those excesses are all zero, 1.0 where it has no spread at all."""
    m = len(reference)
    if m < 2:
        return 1.0
    k = max(1, min(m - 1, math.ceil(m / 10)))
    excess = reference[m - k:] - reference[m - k - 1] if side == "upper" else reference[k] - reference[:k]
    scale = float(np.mean(excess))
    if not scale > 0:
        spread = float(np.std(reference))
        scale = spread if spread > 0 else 1.0
    return scale


@dataclass(frozen=True)
class Term:
    statistic: str
    tail: str
    reference: np.ndarray  # sorted ascending, the statistic's values on the reference (val) split
    scales: Tuple[float, float] = field(init=False, repr=False, compare=False)  # tail_scale upper, lower

    def __post_init__(self) -> None:
        if self.tail not in TAILS:
            raise ValueError(f"tail must be one of {TAILS}, got {self.tail!r}")
        if self.reference.ndim != 1 or len(self.reference) < 1 or not np.isfinite(self.reference).all():
            raise ValueError(f"term {self.statistic!r}: the reference must be a non-empty list of finite numbers")
        object.__setattr__(self, "scales", (tail_scale(self.reference, "upper"), tail_scale(self.reference, "lower")))

    def past_reference(self, values: np.ndarray) -> np.ndarray:
        """-ln of the exponential tail's factor: excess / s past the reference's extreme on the term's tail
        (either side for two-sided), 0 inside it."""
        upper = np.maximum(0.0, values - self.reference[-1]) / self.scales[0]
        lower = np.maximum(0.0, self.reference[0] - values) / self.scales[1]
        return {"upper": upper, "lower": lower, "two-sided": upper + lower}[self.tail]


@dataclass(frozen=True)
class Combination:
    """The score of a ``fisher-<compressor>`` kind: -sum ln p_i over its terms' reference p-values (nats)."""

    compressor: str
    terms: Tuple[Term, ...]
    beyond: str = "counts"  # an artifact that does not say: written before the tails existed

    def __post_init__(self) -> None:
        if self.beyond not in BEYOND:
            raise ValueError(f"beyond must be one of {BEYOND}, got {self.beyond!r}")

    @property
    def needs_neighbours(self) -> bool:
        """Whether a term tests ``latent-nn`` (the artifact's ``latent_neighbour_distance`` must be called)."""
        return any(t.statistic == NEIGHBOURS for t in self.terms)

    @classmethod
    def fit(cls, compressor: str, nll: np.ndarray, elbo: np.ndarray, bits: np.ndarray,
            latent_nn: Optional[np.ndarray] = None) -> "Combination":
        """The kind's terms with their references: ``nll``, ``elbo``, ``bits`` (and for a ``-nn`` kind
        ``latent_nn``) of the reference (val) images."""
        stats = statistics(nll, elbo, bits, compressor, latent_nn)
        terms = recipe(compressor, neighbours=latent_nn is not None)
        return cls(compressor, tuple(Term(name, tail, np.sort(stats[name])) for name, tail in terms),
                   beyond="exponential")

    @classmethod
    def from_dict(cls, spec: Mapping) -> "Combination":
        """From an artifact's ``scoring.kinds[kind]["combination"]``; ValueError saying what is wrong."""
        if not isinstance(spec, Mapping) or spec.get("method") != "fisher":
            raise ValueError(f"expected a combination with method 'fisher', got {spec!r:.200}")
        compressor = spec.get("compressor")
        if compressor not in complexity.COMPRESSORS:
            raise ValueError(f"unknown compressor {compressor!r}; known: {list(complexity.COMPRESSORS)}")
        terms = []
        for term in spec.get("terms") or ():
            reference = np.asarray(term["reference"], dtype=np.float64)
            terms.append(Term(str(term["statistic"]), str(term["tail"]), np.sort(reference)))
        known = set(statistics(np.zeros(1), np.zeros(1), np.zeros(1), compressor, np.zeros(1)))
        if not terms or any(t.statistic not in known for t in terms):
            raise ValueError(f"combination terms must be some of {sorted(known)}, got "
                             f"{[t.statistic for t in terms]}")
        return cls(compressor, tuple(terms), beyond=str(spec.get("beyond", "counts")))

    def to_dict(self) -> Dict:
        return {"method": "fisher", "compressor": self.compressor, "reference_split": "val", "beyond": self.beyond,
                "terms": [{"statistic": t.statistic, "tail": t.tail, "n": len(t.reference),
                           "reference": [float(v) for v in t.reference]} for t in self.terms]}

    def scores(self, nll: np.ndarray, elbo: np.ndarray, bits: np.ndarray,
               latent_nn: Optional[np.ndarray] = None) -> np.ndarray:
        """-sum_i ln p_i per image (nats), float64 (N,); each row on its own (see the module docstring).
        ``latent_nn``: the images' ``latent_neighbour_distance``, which a kind that ``needs_neighbours`` must get."""
        if self.needs_neighbours and latent_nn is None:
            raise ValueError("this combination tests latent-nn: pass the images' latent_neighbour_distance")
        stats = statistics(nll, elbo, bits, self.compressor, latent_nn)
        p = np.stack([reference_p_values(t.reference, stats[t.statistic], t.tail) for t in self.terms], axis=1)
        if self.beyond == "counts":
            return np.array([-math.fsum(math.log(v) for v in row) for row in p.tolist()], dtype=np.float64)
        tails = np.stack([t.past_reference(stats[t.statistic]) for t in self.terms], axis=1)
        rows = zip(p.tolist(), tails.tolist())
        return np.array([math.fsum([-math.log(v) for v in row] + extra) for row, extra in rows], dtype=np.float64)


def describe(compressor: str, neighbours: bool = False) -> Dict:
    """The artifact's ``scoring.kinds[fisher-<c>]`` (``fisher-<c>-nn`` with ``neighbours``) without its fitted
    combination."""
    terms = " + ".join(f"{name} ({tail})" for name, tail in recipe(compressor, neighbours))
    described = {"formula": f"-sum ln p_i over reference p-values of {terms}, each continued past the reference's "
                            "extreme by an exponential tail; Fisher's method", "units": "nats",
                 "complexity": complexity.describe(compressor),
                 "reference": REFERENCE + (NN_REFERENCE if neighbours else "")}
    if neighbours:
        described["neighbours"] = ("latent-nn: Euclidean distance from the posterior mean to the nearest posterior "
                                   "mean of the artifact's latent_bank (training images), by its "
                                   "latent_neighbour_distance method")
    return described


__all__: Sequence[str] = ("BEYOND", "Combination", "NEIGHBOURS", "NN_SUFFIX", "PREFIX", "Term", "describe", "recipe",
                          "reference_p_values", "statistics", "tail_scale")
