"""Combined anomaly scores: several per-image statistics, each a p-value against normal images, in one score.

Each statistic is turned into a conformal p-value against a **reference** sample of normal images (the artifact
stores the sorted reference values, the val split's, computed exactly as the service computes them), and a
kind adds up the surprises -ln p_i of its terms. The statistics:

- ``nll-minus-<c>``, upper tail: the model explains x worse than a generic compressor does, relative to normal
  images (Serrà et al. 2020): inputs unlike the training data that are not simpler than it;
- ``bits-<c>``, lower tail: x is simpler than normal images (a typicality test on input complexity, after
  Nalisnick et al. 2019), the blind spot of likelihoods: a model prefers simple inputs (a held-out MNIST "1"
  has a lower NLL than the digits it was trained on). Only the lower tail: the upper one, inputs more complex
  than normal, is already the first question's (the model explains noise far worse than bz2 does);
- ``iw-gap``, upper tail: log p(x) (the K-sample bound) minus the ELBO, both from the same K samples: how much
  the importance samples improve on the encoder's own posterior, which was fitted to normal images. A free
  stand-in for likelihood regret (Xiao et al. 2020), which re-fits the encoder per input;
- ``latent-nn``, upper tail: the Euclidean distance from x's posterior mean to the nearest posterior mean of the
  artifact's bank of training images (its ``latent_neighbour_distance``; Sun et al. 2022);
- ``latent-density``, upper tail: -log q(f(x)), f(x) the posterior mean and mean posterior log-variance, q a
  mixture of full-covariance Gaussians fitted to the training images' features, class by class when the data
  has labels (its ``latent_log_density``; the class-conditional Gaussians of Lee et al. 2018, with several
  components a class). The likelihood questions ask how well x is explained; this one asks *what* x is. An
  unseen class of the same kind of image (a digit the model never saw) is explained about as well as the seen
  ones, yet its encoding lands where no class's does, or the encoder is unusually sure or unsure of it.

The kinds:

- ``fisher-<c>``: nll-minus-<c>, bits-<c> and iw-gap, summed (Fisher's method, Fisher 1932, §21.1);
- ``fisher-<c>-nn``: those three and latent-nn, summed;
- ``density-<c>``: latent-density, with nll-minus-<c> and bits-<c> as **guards**. A guard adds only the part of
  its surprise past the most extreme reference image (the exponential tail below), nothing inside the
  reference. Summing every surprise in full would let each question that has nothing to say about an input add
  its own noise (-ln p of a uniform p) to the one that has: on an unseen class, where the density carries the
  signal, that costs more than the other terms add. The guards keep what they are there for, inputs unlike
  anything normal (another data set, noise, a blank image), whose surprise is far past the reference.

The combined score is one more statistic: its own conformal calibration (the calib split, the same K and
noise) gives its p-values. The reference sample must not be the calibration sample: fitted and calibrated on
the same rows, the scores of those rows are not exchangeable with fresh ones (each row counts itself in its own
reference p-values) and the false-positive guarantee is lost. Training uses the val split, which neither trains
the weights nor calibrates. The sum needs no independence between the p-values: the combined score is
calibrated as a whole, so dependence and the choice of terms only change power, never validity.

Past the reference's extreme a count stops at 1/(m + 1): every input beyond it, a little or a thousand nats,
would get the same p-value, and the combined score would top out at a few times ln(m + 1). With a small
reference (a few hundred images) that cap sits below what the most unusual calibration images reach, and pure
noise could never be flagged at a small alpha. So beyond the extreme a term continues as an exponential tail
(``beyond = "exponential"``, every new artifact): p = 1/(m + 1) exp(-excess / s), where s is the mean excess of
the reference's most extreme tenth over the value just inside it (peaks over a threshold with a generalised
Pareto tail of shape 0; Pickands 1975). Inside the reference nothing changes; any monotone extension keeps the
combined score valid, since it is calibrated as a whole. Artifacts written before it say nothing and keep the
counts (``beyond = "counts"``), so their stored calibration stays the scores the service computes.

Row by row and exact: a reference p-value is a count (``searchsorted``) turned into a rational, its logarithm
is ``math.log`` of one number, a tail adds one division, and the sum has a fixed order, so a row's score does
not depend on the other rows of its batch. Numpy only.
"""

import math
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, Iterable, Mapping, Optional, Sequence, Tuple

import numpy as np

from vae_artifact import complexity
from vae_artifact.metadata import LATENT_STATISTICS

TAILS = ("upper", "lower", "two-sided")
BEYOND = ("counts", "exponential")  # past the reference's extreme: stop at 1/(m + 1), or continue (docstring)
COUNTED = ("whole", "beyond")  # a term's whole surprise, or a guard's part past the reference (docstring)
PREFIX = "fisher-"  # kind names: fisher-<compressor>, fisher-<compressor>-nn
NN_SUFFIX = "-nn"
DENSITY_PREFIX = "density-"  # kind names: density-<compressor>
NEIGHBOURS = "latent-nn"  # the statistic of the artifact's latent_neighbour_distance
DENSITY = "latent-density"  # the statistic of the artifact's latent_log_density (negated)
REFERENCE = ("Fisher 1932 (combining p-values, -sum ln p); Serrà et al. 2020 (input complexity); Nalisnick et al. "
             "2019 (typicality); Xiao et al. 2020 (likelihood regret: the encoder's fit to the input)")
NN_REFERENCE = "; Sun et al. 2022 (nearest neighbours in a learned representation)"
DENSITY_REFERENCE = ("Lee et al. 2018 (class-conditional Gaussians of a learned representation); Serrà et al. 2020 "
                     "(input complexity); Nalisnick et al. 2019 (typicality); Pickands 1975 (the tails past the "
                     "reference)")

Recipe = Tuple[Tuple[str, str, str], ...]  # (statistic, tail, counted) per term


def is_combined(kind: str) -> bool:
    """Whether ``kind`` names a combined kind (fisher-<c>, fisher-<c>-nn, density-<c>)."""
    try:
        recipe(kind)
    except ValueError:
        return False
    return True


def compressor_of(kind: str) -> str:
    """The compressor a combined kind's terms use; ValueError for any other name."""
    name = kind[len(DENSITY_PREFIX):] if kind.startswith(DENSITY_PREFIX) else kind[len(PREFIX):]
    name = name[:-len(NN_SUFFIX)] if kind.startswith(PREFIX) and name.endswith(NN_SUFFIX) else name
    if not kind.startswith((PREFIX, DENSITY_PREFIX)) or name not in complexity.COMPRESSORS:
        raise ValueError(f"{kind!r} is not a combined kind: fisher-<c>, fisher-<c>-nn or density-<c>, c one of "
                         f"{list(complexity.COMPRESSORS)}")
    return name


def recipe(kind: str) -> Recipe:
    """The (statistic, tail, counted) terms of a combined kind (the module docstring says why)."""
    c = compressor_of(kind)
    if kind.startswith(DENSITY_PREFIX):
        return ((DENSITY, "upper", "whole"), (f"nll-minus-{c}", "upper", "beyond"), (f"bits-{c}", "lower", "beyond"))
    terms = ((f"nll-minus-{c}", "upper", "whole"), (f"bits-{c}", "lower", "whole"), ("iw-gap", "upper", "whole"))
    return terms + ((NEIGHBOURS, "upper", "whole"),) if kind.endswith(NN_SUFFIX) else terms


def latent_needs(kind: str) -> FrozenSet[str]:
    """The latent outputs (``LATENT_STATISTICS``' output names) a combined kind's terms need."""
    return _latent_outputs(name for name, _, _ in recipe(kind))


def _latent_outputs(statistics_: Iterable[str]) -> FrozenSet[str]:
    return frozenset(LATENT_STATISTICS[name][1] for name in statistics_ if name in LATENT_STATISTICS)


def statistics(nll: np.ndarray, elbo: np.ndarray, bits: Optional[np.ndarray], compressor: Optional[str],
               latent: Optional[Mapping[str, np.ndarray]] = None) -> Dict[str, np.ndarray]:
    """The per-image statistics a term may test, float64 (N,), from the NLL and ELBO (nats) of one ``score``
    call: ``nll``, ``iw-gap`` = -nll - elbo (nats, >= 0), with a compressor's ``bits`` also ``bits-<c>``
    (bits) and ``nll-minus-<c>`` (nats, the complexity-corrected NLL), and from ``latent`` (the artifact's latent
    methods' outputs, by output name) ``latent-nn`` (the distance) and ``latent-density`` (-log density, nats)."""
    nll, elbo = np.asarray(nll, dtype=np.float64), np.asarray(elbo, dtype=np.float64)
    stats = {"nll": nll, "iw-gap": -nll - elbo}
    if bits is not None:
        bits = np.asarray(bits, dtype=np.float64)
        stats[f"bits-{compressor}"] = bits
        stats[f"nll-minus-{compressor}"] = complexity.corrected(nll, bits)
    for statistic, (_, output) in LATENT_STATISTICS.items():
        if latent is not None and output in latent:
            value = np.asarray(latent[output], dtype=np.float64)
            stats[statistic] = -value if statistic == DENSITY else value
    return stats


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
    counted: str = "whole"  # COUNTED: the whole surprise, or a guard's part past the reference
    scales: Tuple[float, float] = field(init=False, repr=False, compare=False)  # tail_scale upper, lower

    def __post_init__(self) -> None:
        if self.tail not in TAILS:
            raise ValueError(f"tail must be one of {TAILS}, got {self.tail!r}")
        if self.counted not in COUNTED:
            raise ValueError(f"counted must be one of {COUNTED}, got {self.counted!r}")
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
    """The score of a combined kind: the sum of its terms' surprises (nats); the module docstring says which."""

    compressor: str
    terms: Tuple[Term, ...]
    beyond: str = "counts"  # an artifact that does not say: written before the tails existed

    def __post_init__(self) -> None:
        if self.beyond not in BEYOND:
            raise ValueError(f"beyond must be one of {BEYOND}, got {self.beyond!r}")
        if self.beyond == "counts" and any(t.counted == "beyond" for t in self.terms):
            raise ValueError("a guard term (counted beyond the reference) needs beyond = 'exponential'")

    @property
    def latent_needs(self) -> FrozenSet[str]:
        """The latent outputs (``LATENT_STATISTICS``' output names) its terms test: the artifact methods that must
        be called beside ``score``."""
        return _latent_outputs(t.statistic for t in self.terms)

    @classmethod
    def fit(cls, kind: str, nll: np.ndarray, elbo: np.ndarray, bits: np.ndarray,
            latent: Optional[Mapping[str, np.ndarray]] = None) -> "Combination":
        """``kind``'s terms with their references: ``nll``, ``elbo``, ``bits`` and the ``latent`` outputs its
        terms need (``latent_needs``) of the reference (val) images."""
        compressor = compressor_of(kind)
        stats = statistics(nll, elbo, bits, compressor, latent)
        missing = [name for name, _, _ in recipe(kind) if name not in stats]
        if missing:
            raise ValueError(f"kind {kind!r} needs {missing} of the reference images")
        return cls(compressor, tuple(Term(name, tail, np.sort(stats[name]), counted)
                                     for name, tail, counted in recipe(kind)), beyond="exponential")

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
            terms.append(Term(str(term["statistic"]), str(term["tail"]), np.sort(reference),
                              str(term.get("counted", "whole"))))
        every = {name: np.zeros(1) for _, name in LATENT_STATISTICS.values()}
        known = set(statistics(np.zeros(1), np.zeros(1), np.zeros(1), compressor, every))
        if not terms or any(t.statistic not in known for t in terms):
            raise ValueError(f"combination terms must be some of {sorted(known)}, got "
                             f"{[t.statistic for t in terms]}")
        return cls(compressor, tuple(terms), beyond=str(spec.get("beyond", "counts")))

    def to_dict(self) -> Dict:
        return {"method": "fisher", "compressor": self.compressor, "reference_split": "val", "beyond": self.beyond,
                "terms": [{"statistic": t.statistic, "tail": t.tail, "counted": t.counted, "n": len(t.reference),
                           "reference": [float(v) for v in t.reference]} for t in self.terms]}

    def scores(self, nll: np.ndarray, elbo: np.ndarray, bits: np.ndarray,
               latent: Optional[Mapping[str, np.ndarray]] = None) -> np.ndarray:
        """The sum of the terms' surprises per image (nats), float64 (N,); each row on its own (see the module
        docstring). ``latent``: the images' latent outputs by name, every one in ``latent_needs``."""
        missing = sorted(self.latent_needs - set(latent or ()))
        if missing:
            raise ValueError(f"this combination tests {missing}: pass the images' artifact outputs of those names")
        stats = statistics(nll, elbo, bits, self.compressor, latent)
        p = np.stack([reference_p_values(t.reference, stats[t.statistic], t.tail) for t in self.terms], axis=1)
        if self.beyond == "counts":
            return np.array([-math.fsum(math.log(v) for v in row) for row in p.tolist()], dtype=np.float64)
        tails = np.stack([t.past_reference(stats[t.statistic]) for t in self.terms], axis=1)
        whole = [t.counted == "whole" for t in self.terms]
        rows = zip(p.tolist(), tails.tolist())
        return np.array([math.fsum([-math.log(v) for v, w in zip(row, whole) if w] + extra) for row, extra in rows],
                        dtype=np.float64)


def describe(kind: str) -> Dict:
    """The artifact's ``scoring.kinds[kind]`` for a combined kind, without its fitted combination."""
    compressor = compressor_of(kind)
    terms = recipe(kind)
    whole = " + ".join(f"{name} ({tail})" for name, tail, counted in terms if counted == "whole")
    guards = " + ".join(f"{name} ({tail})" for name, tail, counted in terms if counted == "beyond")
    formula = f"-sum ln p_i over reference p-values of {whole}, each continued past the reference's extreme by an " \
              "exponential tail"
    if guards:
        formula += f"; plus the guards {guards}, each counted only past the reference's extreme (its tail)"
    described = {"formula": formula, "units": "nats", "complexity": complexity.describe(compressor),
                 "reference": DENSITY_REFERENCE if kind.startswith(DENSITY_PREFIX) else
                 REFERENCE + (NN_REFERENCE if kind.endswith(NN_SUFFIX) else "")}
    if any(name == NEIGHBOURS for name, _, _ in terms):
        described["neighbours"] = ("latent-nn: Euclidean distance from the posterior mean to the nearest posterior "
                                   "mean of the artifact's latent_bank (training images), by its "
                                   "latent_neighbour_distance method")
    if any(name == DENSITY for name, _, _ in terms):
        described["density"] = ("latent-density: -log q(f(x)), f(x) = (posterior mean, mean posterior log-variance), "
                                "q the artifact's mixture of full-covariance Gaussians fitted to the training images' "
                                "features (class by class when labelled), by its latent_log_density method")
    return described


__all__: Sequence[str] = ("BEYOND", "COUNTED", "Combination", "DENSITY", "DENSITY_PREFIX", "NEIGHBOURS", "NN_SUFFIX",
                          "PREFIX", "Term", "compressor_of", "describe", "is_combined", "latent_needs", "recipe",
                          "reference_p_values", "statistics", "tail_scale")
