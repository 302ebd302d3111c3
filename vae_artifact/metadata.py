"""metadata.json: the format version, the exported methods, and the schema as small typed values.

``Metadata.from_dict`` is the one place a document is checked: every reader gets either a ``Metadata`` whose
typed fields it can use without further checks, or ``ArtifactError`` saying what is wrong. Like starlette's
``Headers``, a ``Metadata`` is also the read-only document itself (a ``Mapping``: ``meta["evaluation"]``):
sections this code does not interpret (data, training, evaluation) travel with it unchanged, and a writer's
sections round-trip exactly (``to_dict`` gives a mutable copy). Imports no torch.
"""

import json
import math
import zipfile
from collections.abc import Mapping as MappingABC
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Dict, Iterable, Iterator, Mapping, Optional, Tuple

from vae_artifact.directions import EMPTY as NO_DIRECTIONS, DirectionsSection
from vae_artifact.errors import ArtifactError

FORMAT_VERSION = 1  # bump on incompatible changes; readers refuse newer versions
METADATA_FILE = "metadata.json"  # the name inside the TorchScript zip's extra/ folder
LIKELIHOODS = ("logistic", "bernoulli")
DEFAULT_K = 16  # importance samples per anomaly score when an artifact does not say (docs/anomaly.md)
# The exported TorchScript methods and their signatures (all float32 on the module's device).
METHODS = {
    "encode": "encode(x: float32[B,C,H,W] in [0,1]) -> (mu: [B,D], logvar: [B,D])",
    "decode": "decode(z: float32[B,D]) -> pixel means float32[B,C,H,W] in [0,1]",
    "score": "score(x: float32[B,C,H,W], eps: float32[K,B,D] ~ N(0,I)) -> "
    "(iw_log_likelihood[B], elbo[B], reconstruction[B], kl[B], log_weights[K,B]), nats",
}
KERNELS = tuple(METHODS)
# The prior's methods, listed in ``model.prior.methods`` and exported by artifacts that record ``model.prior``
# (a reader needs them when the prior is not N(0, I); older artifacts have neither and a standard normal prior).
PRIOR_METHODS = {
    "sample_prior": "sample_prior(eps: float32[B,D] ~ N(0,I), component: int64[B] in [0, components)) -> z[B,D]",
    "prior_log_prob": "prior_log_prob(z: float32[...,D]) -> log p(z)[...], nats",
}
# The latent bank's method, listed in ``methods`` by artifacts that carry a bank (a buffer ``latent_bank``
# [N, D]: posterior means of training images); the ``latent-nn`` statistic of the fisher-<c>-nn score kinds.
NEIGHBOUR_METHODS = {
    "latent_neighbour_distance": "latent_neighbour_distance(x: float32[B,C,H,W] in [0,1]) -> distance[B]: "
    "Euclidean, from the posterior mean to the nearest row of latent_bank[N,D]",
}
# The latent density's method, listed in ``methods`` by artifacts that carry one (buffers ``density_*``: a mixture
# of full-covariance Gaussians over each image's latent features); the ``latent-density`` statistic of the
# density-<c> score kinds.
DENSITY_METHODS = {
    "latent_log_density": "latent_log_density(x: float32[B,C,H,W] in [0,1]) -> log q(f(x))[B], float64 nats: "
    "f(x) = (posterior mean, mean posterior log-variance) [B,D+1], q the mixture of density_means[M,D+1], "
    "density_precision_cholesky[M,D+1,D+1] and density_log_constant[M]",
}
# Per-image statistics of where an image lands in latent space, each computed by one exported method that an
# artifact lists when it carries what the method needs: statistic (as combined kinds' terms name it) ->
# (method, the output's name beside the score's outputs).
LATENT_STATISTICS = {
    "latent-nn": ("latent_neighbour_distance", "latent_nn"),
    "latent-density": ("latent_log_density", "latent_log_density"),
}
PRIORS = ("standard", "vamp")  # N(0, I); the VampPrior (a uniform mixture of posteriors at pseudo-inputs)
# Anomaly score kinds, best first (measured: docs/results.md). A writer records the first it computed as
# ``scoring.default``; a reader that cannot offer an artifact's default (no latent bank, a compressor it cannot
# reproduce) uses the first of these it can offer, else ``nll``.
PREFERRED_KINDS = ("density-bz2", "fisher-bz2-nn", "fisher-bz2", "nll-minus-bz2")


def latent_outputs(document: Mapping[str, Any]) -> Dict[str, str]:
    """The latent statistics a metadata document (or ``Metadata``) lists the methods of: output name -> method."""
    methods = document.get("methods") or {}
    return {output: method for method, output in LATENT_STATISTICS.values() if method in methods}


def preferred_kind(offered: Iterable[str]) -> str:
    """The first of ``PREFERRED_KINDS`` among ``offered`` score kinds, else ``nll`` (which every artifact has)."""
    offered = set(offered)
    return next((kind for kind in PREFERRED_KINDS if kind in offered), "nll")


@dataclass(frozen=True)
class ImageShape:
    channels: int
    height: int
    width: int

    @property
    def num_dims(self) -> int:
        return self.channels * self.height * self.width


@dataclass(frozen=True)
class ScoringSection:
    """``scoring``: how anomaly scores are computed (K importance samples, the noise seed, the kinds)."""

    k: int
    noise_seed: int
    default: str
    kinds: Mapping[str, Mapping[str, Any]]  # name -> description (formula, units, complexity spec or None)
    # ``score`` reduces over K along contiguous rows, so a row's bits do not depend on how many rows share the
    # call. Artifacts written before this field reduce over a (K, B) column, whose summation order changes
    # with B: a reader must then call ``score`` at one fixed batch size to keep a row's bits.
    batch_invariant: bool = False


@dataclass(frozen=True)
class PriorSection:
    """``model.prior``: p(z). ``standard`` is N(0, I) (one component); ``vamp`` a uniform mixture of
    ``components`` diagonal Gaussians, sampled through the artifact's ``sample_prior`` (PRIOR_METHODS)."""

    name: str = "standard"
    components: int = 1

    @property
    def is_standard(self) -> bool:
        return self.name == "standard"


@dataclass(frozen=True)
class CalibrationSection:
    """``calibration``: every kind's scores of the held-out calib split, sorted, with the K used."""

    n: int
    k: int
    scores: Mapping[str, Tuple[float, ...]]


@dataclass(frozen=True, eq=False)  # equality is the Mapping's: the same document
class Metadata(MappingABC):
    format_version: int
    image: ImageShape
    latent_dim: int
    likelihood: str
    levels: int  # pixel levels of the data the model was trained on (256 for 8-bit, 2 when binarised)
    scoring: ScoringSection
    calibration: Optional[CalibrationSection]  # None: the artifact offers no p-values
    weights_sha256: Optional[str]
    created: str
    document: Mapping[str, Any]  # the whole metadata.json, read-only
    directions: DirectionsSection = NO_DIRECTIONS  # latent directions for edits (vae_artifact.directions)
    prior: PriorSection = PriorSection()  # absent in older artifacts: N(0, I)

    @classmethod
    def from_dict(cls, document: Any, source: str = "artifact") -> "Metadata":
        """Check a metadata.json document; ArtifactError naming ``source`` and the problem otherwise."""
        if not isinstance(document, dict) or not isinstance(document.get("format_version"), int):
            raise ArtifactError(f"{source}: no metadata.json with an integer format_version inside")
        version = document["format_version"]
        if version > FORMAT_VERSION:
            raise ArtifactError(
                f"{source}: artifact format {version} is newer than this code understands (format {FORMAT_VERSION} "
                f"and older): newer than this service supports; upgrade it")
        try:
            model = document["model"]
            image = ImageShape(_int(model["image"]["channels"]), _int(model["image"]["height"]),
                               _int(model["image"]["width"]))
            latent_dim = _int(model["latent_dim"])
            levels = _int((document.get("pixels") or {}).get("levels", 256))
            scoring = _scoring(document.get("scoring") or {})
            calibration = _calibration(document.get("calibration"))
            directions = DirectionsSection.from_dict(document.get("directions"), latent_dim)
            prior = _prior(model.get("prior"))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:  # AttributeError: a section not an object
            raise ArtifactError(f"{source}: metadata lacks or mangles a required field ({exc!r}); needs "
                                "model.image.{channels,height,width} and model.latent_dim") from exc
        likelihood = str(model.get("likelihood", "logistic"))
        if likelihood not in LIKELIHOODS:
            raise ArtifactError(f"{source}: unknown likelihood {likelihood!r}; known: {list(LIKELIHOODS)}")
        if min(image.channels, image.height, image.width, latent_dim) < 1 or levels < 2:
            raise ArtifactError(f"{source}: image {image}, latent_dim {latent_dim} and levels {levels} must be positive")
        sha = document.get("weights_sha256")
        return cls(format_version=version, image=image, latent_dim=latent_dim, likelihood=likelihood, levels=levels,
                   scoring=scoring, calibration=calibration, weights_sha256=sha if isinstance(sha, str) else None,
                   created=str(document.get("created", "unknown")), document=MappingProxyType(document),
                   directions=directions, prior=prior)

    def to_dict(self) -> Dict[str, Any]:
        """A deep copy of the whole document (JSON types only)."""
        return json.loads(json.dumps(dict(self.document)))

    def __getitem__(self, key: str) -> Any:
        return self.document[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.document)

    def __len__(self) -> int:
        return len(self.document)


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise ValueError(f"expected an integer, got {value!r}")
    return int(value)


def _scoring(section: Mapping[str, Any]) -> ScoringSection:
    kinds = section.get("kinds") or {"nll": {"units": "nats", "complexity": None}}
    if not isinstance(kinds, dict):
        raise ValueError(f"scoring.kinds must be an object, got {type(kinds).__name__}")
    k = _int(section.get("k", DEFAULT_K))
    if k < 1:
        raise ValueError(f"scoring.k must be >= 1, got {k}")
    return ScoringSection(k=k, noise_seed=_int(section.get("noise_seed", 0)), default=str(section.get("default", "nll")),
                          kinds=MappingProxyType({str(name): MappingProxyType(dict(d or {})) for name, d in kinds.items()}),
                          batch_invariant=section.get("batch_invariant") is True)


def _prior(section: Any) -> PriorSection:
    if section is None:
        return PriorSection()
    name = str(section["name"])
    if name not in PRIORS:
        raise ValueError(f"model.prior.name must be one of {list(PRIORS)}, got {name!r}")
    components = _int(section.get("components", 1))
    # At most 2**24: a service passes component indices as float32 rows, exact up to there.
    if not 1 <= components <= 2**24 or (name == "standard" and components != 1):
        raise ValueError(f"model.prior.components must be in [1, 2**24] (1 for the standard prior), got {components}")
    return PriorSection(name=name, components=components)


def _calibration(section: Any) -> Optional[CalibrationSection]:
    if not section or not section.get("scores"):
        return None
    scores = {}
    for kind, values in section["scores"].items():
        values = tuple(float(v) for v in values)
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"calibration.scores[{kind!r}] has non-finite values")
        scores[str(kind)] = tuple(sorted(values))
    return CalibrationSection(n=_int(section.get("n", len(next(iter(scores.values()))))), k=_int(section.get("k", 0)),
                       scores=MappingProxyType(scores))


def read_metadata(path: Path) -> Metadata:
    """The checked metadata of an artifact file, read from its zip without loading the model (or torch)."""
    try:
        with zipfile.ZipFile(path) as archive:
            name = next((n for n in archive.namelist() if n.endswith(f"extra/{METADATA_FILE}")), None)
            if name is None:
                raise ArtifactError(f"{path}: no embedded {METADATA_FILE}")
            document = json.loads(archive.read(name))
    except (OSError, zipfile.BadZipFile, ValueError) as exc:
        raise ArtifactError(f"{path}: not a readable artifact ({type(exc).__name__}: {exc})") from exc
    return Metadata.from_dict(document, str(path))
