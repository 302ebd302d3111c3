"""Latent directions: the artifact's ``directions`` section as typed values, and the math both halves share.

An edit moves an image's posterior mean along a stored vector and decodes it: ``z' = mu + strength * vector``,
with ``strength`` in raw latent units of the vector as stored (strength 1 adds the whole vector; a direction's
``norm`` says how far that is). A direction is the attribute-vector recipe of White 2016 ("Sampling
Generative Networks"): the mean posterior mean of images with the attribute minus that of images without.
Training computes the directions it stores with ``direction`` and ``projection_auroc``; the service computes
directions from example images with the same two functions, so both halves get the same vector from the
same posterior means.

Kinds: ``class`` (``class:<label>``: that label against the rest), ``pixel`` (``pixel:<statistic>``: the top
quartile of a pixel statistic against the bottom quartile), ``custom`` (added to an existing artifact from
example folders). Each records how many images it was built from and a held-out AUROC of the projection
<mu, v> separating positives from negatives (None when there was nothing held out to check it on).

Numpy only: no torch, no scikit-learn (the service has neither of the latter).
"""

import math
import re
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np

KINDS = ("class", "pixel", "custom")
EDIT = "z' = mu + strength * vector (strength in raw latent units of the vector as stored)"
NAME = re.compile(r"^[A-Za-z0-9_.:+\-]{1,64}$")  # e.g. class:3, pixel:ink, thick-strokes
FOLDS = 4  # cross-fitting folds for the held-out AUROC of directions computed from examples
SPLIT_SEED = 0  # fixed: the same examples always get the same folds, so the same AUROC to the bit


@dataclass(frozen=True)
class Direction:
    """One named direction in latent space (float64 vector of the model's latent size)."""

    name: str
    kind: str  # one of KINDS
    description: str  # one line
    vector: Tuple[float, ...]
    n_pos: int  # images with the attribute the vector was built from
    n_neg: int  # images without it
    auroc: Optional[float]  # held out: P(<mu_pos, v> > <mu_neg, v>), ties counting half; None if unchecked

    @property
    def norm(self) -> float:
        return float(np.linalg.norm(self.array))

    @property
    def array(self) -> np.ndarray:
        return np.asarray(self.vector, dtype=np.float64)

    @classmethod
    def from_dict(cls, item: Any, latent_dim: int) -> "Direction":
        """Check one entry of ``directions.items``; ValueError naming the entry and the problem otherwise."""
        if not isinstance(item, dict):
            raise ValueError(f"a direction must be an object, got {type(item).__name__}")
        name = item.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            raise ValueError(f"direction name {name!r} must be 1-64 characters of letters, digits and _.:+-")
        kind = item.get("kind")
        if kind not in KINDS:
            raise ValueError(f"direction {name!r}: kind {kind!r} is not one of {list(KINDS)}")
        vector = item.get("vector")
        if (not isinstance(vector, list) or len(vector) != latent_dim
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vector)):
            raise ValueError(f"direction {name!r}: vector must be a list of {latent_dim} numbers (the latent size)")
        if not all(math.isfinite(v) for v in vector):
            raise ValueError(f"direction {name!r}: vector has non-finite values")
        auroc = item.get("auroc")
        if auroc is not None and (not isinstance(auroc, (int, float)) or not 0.0 <= auroc <= 1.0):
            raise ValueError(f"direction {name!r}: auroc must be null or in [0, 1], got {auroc!r}")
        counts = [item.get("n_pos"), item.get("n_neg")]
        if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in counts):
            raise ValueError(f"direction {name!r}: n_pos and n_neg must be positive integers, got {counts}")
        return cls(name=name, kind=kind, description=str(item.get("description", "")),
                   vector=tuple(float(v) for v in vector), n_pos=counts[0], n_neg=counts[1],
                   auroc=None if auroc is None else float(auroc))

    def to_dict(self, vector: bool = True) -> Dict[str, Any]:
        """The artifact's (and ``GET /directions``') form; ``vector=False`` leaves the vector out."""
        out: Dict[str, Any] = {"name": self.name, "kind": self.kind, "description": self.description,
                               "n_pos": self.n_pos, "n_neg": self.n_neg, "norm": self.norm, "auroc": self.auroc}
        if vector:
            out["vector"] = list(self.vector)
        return out


@dataclass(frozen=True)
class DirectionsSection:
    """``directions``: the artifact's named directions, in their stored order (empty in older artifacts)."""

    items: Mapping[str, Direction]

    @classmethod
    def from_dict(cls, section: Any, latent_dim: int) -> "DirectionsSection":
        if section is None:
            return EMPTY
        if not isinstance(section, dict) or not isinstance(section.get("items", []), list):
            raise ValueError("directions must be an object with a list of items")
        items: Dict[str, Direction] = {}
        for entry in section.get("items", []):
            direction = Direction.from_dict(entry, latent_dim)
            if direction.name in items:
                raise ValueError(f"direction {direction.name!r} appears twice")
            items[direction.name] = direction
        return cls(MappingProxyType(items))

    def to_dict(self) -> Dict[str, Any]:
        return {"edit": EDIT, "items": [d.to_dict() for d in self.items.values()]}

    def with_direction(self, direction: Direction, replace: bool = False) -> "DirectionsSection":
        """A copy with ``direction`` added (or, with ``replace``, put in place of the one of its name)."""
        if direction.name in self.items and not replace:
            raise ValueError(f"the artifact already has a direction {direction.name!r}")
        return DirectionsSection(MappingProxyType({**self.items, direction.name: direction}))

    def __iter__(self) -> Iterator[Direction]:
        return iter(self.items.values())

    def __len__(self) -> int:
        return len(self.items)

    def names(self) -> List[str]:
        return list(self.items)


EMPTY = DirectionsSection(MappingProxyType({}))


# -- the math ---------------------------------------------------------------------------------------------


def direction(mu_pos: np.ndarray, mu_neg: np.ndarray) -> np.ndarray:
    """mean(mu_pos) - mean(mu_neg): float64 (D,) from posterior means (N, D) of each side (each N >= 1)."""
    mu_pos, mu_neg = np.asarray(mu_pos, np.float64), np.asarray(mu_neg, np.float64)
    if mu_pos.ndim != 2 or mu_neg.ndim != 2 or mu_pos.shape[1] != mu_neg.shape[1]:
        raise ValueError(f"posterior means must be (N, D) of one D, got {mu_pos.shape} and {mu_neg.shape}")
    if len(mu_pos) == 0 or len(mu_neg) == 0:
        raise ValueError(f"a direction needs at least one image on each side, got {len(mu_pos)} and {len(mu_neg)}")
    return mu_pos.mean(axis=0) - mu_neg.mean(axis=0)


def auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    """Area under the ROC curve of scores ``pos`` (should be higher) against ``neg``: the Mann-Whitney U
    statistic over n_pos * n_neg, ties counting half (midranks). Equals sklearn's ``roc_auc_score``."""
    pos, neg = np.asarray(pos, np.float64).ravel(), np.asarray(neg, np.float64).ravel()
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError(f"AUROC needs scores on both sides, got {len(pos)} and {len(neg)}")
    scores = np.concatenate([pos, neg])
    # Midranks: the members of a group of equal scores all get the group's mean rank (1-based).
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    ranks = ((ends - counts + 1 + ends) / 2.0)[inverse.ravel()]
    u = ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2.0
    return float(u / (len(pos) * len(neg)))


def projection_auroc(vector: np.ndarray, mu_pos: np.ndarray, mu_neg: np.ndarray) -> float:
    """AUROC of <mu, vector> separating positives from negatives."""
    v = np.asarray(vector, np.float64)
    return auroc(np.asarray(mu_pos, np.float64) @ v, np.asarray(mu_neg, np.float64) @ v)


def folds(n: int, k: int = FOLDS, seed: int = SPLIT_SEED) -> np.ndarray:
    """Fold index (0 .. min(k, n) - 1) of each of n examples: a seeded permutation dealt round-robin, so the
    same n always gets the same folds."""
    return np.argsort(np.random.default_rng(seed).permutation(n), kind="stable") % max(1, min(k, n))


def cross_fitted_auroc(mu_pos: np.ndarray, mu_neg: np.ndarray, k: int = FOLDS) -> Optional[float]:
    """A held-out AUROC for a direction computed from all the examples: each fold's projections come from the
    direction of the other folds, and the AUROC is taken over every example's held-out projection. None when a
    side has fewer than 2 examples (nothing left to hold out)."""
    mu_pos, mu_neg = np.asarray(mu_pos, np.float64), np.asarray(mu_neg, np.float64)
    k = min(k, len(mu_pos), len(mu_neg))
    if k < 2:
        return None
    fold_pos, fold_neg = folds(len(mu_pos), k), folds(len(mu_neg), k)
    scores_pos, scores_neg = np.empty(len(mu_pos)), np.empty(len(mu_neg))
    for f in range(k):
        v = direction(mu_pos[fold_pos != f], mu_neg[fold_neg != f])
        scores_pos[fold_pos == f] = mu_pos[fold_pos == f] @ v
        scores_neg[fold_neg == f] = mu_neg[fold_neg == f] @ v
    return auroc(scores_pos, scores_neg)


def from_examples(name: str, kind: str, description: str, mu_pos: np.ndarray, mu_neg: np.ndarray) -> Direction:
    """A direction from every example's posterior mean, its AUROC cross-fitted (``cross_fitted_auroc``)."""
    vector = direction(mu_pos, mu_neg)
    return Direction(name=name, kind=kind, description=description, vector=tuple(float(v) for v in vector),
                     n_pos=len(mu_pos), n_neg=len(mu_neg), auroc=cross_fitted_auroc(mu_pos, mu_neg))


def edit(mu: np.ndarray, vector: np.ndarray, strengths: Sequence[float]) -> np.ndarray:
    """z' = mu + s * vector for every row of ``mu`` (N, D) and every s: float32 (N, S, D), computed in
    float64 (so a row's z' depends only on its own mu, vector and s)."""
    mu64 = np.asarray(mu, np.float64)[:, None, :]
    s = np.asarray(strengths, np.float64)[None, :, None]
    with np.errstate(over="ignore", invalid="ignore"):  # overflow shows as inf, which callers refuse
        return (mu64 + s * np.asarray(vector, np.float64)[None, None, :]).astype(np.float32)
