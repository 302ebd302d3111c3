"""The Open Inference Protocol's models on the one loaded artifact: ``encoder``, ``decoder`` and ``scorer``.

A table, name -> the model's inputs and outputs (datatypes, and shapes from the artifact's metadata) and how a
request runs: through the same batcher kernels, limits and deadlines as /encode, /decode and /anomaly-score,
so a model's outputs are those endpoints' numbers, bit for bit.

- ``encoder``: ``images`` (N, C, H, W), UINT8 0..255 or FP32 in [0, 1] -> ``mu``, ``logvar`` (N, D) FP32;
- ``decoder``: ``z`` (N, D) FP32 -> ``pixels`` (N, C, H, W) FP32 pixel means in [0, 1];
- ``scorer``: ``images`` -> the /anomaly-score numbers, one FP64 (or BOOL) vector each; request parameters
  ``k``, ``alpha``, ``score`` and ``tail`` as that endpoint's query parameters.

Images are 8-bit, as everywhere in this service: FP32 pixels are checked (finite, in [0, 1]) and quantised to
round(255 x), as /encode does with a float npy batch; so FP32 u / 255 and UINT8 u are the same input.
"""

import math
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Awaitable, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from service.config import Settings
from service.core import codecs, scoring
from service.core.anomaly import score_images
from service.core.batching import Batcher
from service.core.errors import InvalidTensor, RequestTooLarge, UnknownModel
from service.core.runtime import ModelInfo
from service.core.served import ServedModel
from service.oip.wire import InferInput, InferRequest, Parameters, decoded_body, parse_request

VERSION = "1"  # one artifact is served at a time; its identity is /v1/model's sha256
PLATFORM = "pytorch_torchscript"
MODEL_NAMES = ("encoder", "decoder", "scorer")
IMAGES, LATENTS = ("FP32", "UINT8"), ("FP32",)
TAILS = ("upper", "two-sided")
# Scorer outputs: the /anomaly-score row field each comes from. The calibrated ones only exist at the
# calibration's K (at another K that endpoint gives null; a tensor cannot, so they are left out).
SCORE_FIELDS = {"score": "score_nats", "nll": "nll_nats", "nll_bits_per_dim": "nll_bits_per_dim",
                "nll_se": "nll_se_nats", "ess": "ess", "elbo": "elbo_nats", "reconstruction": "reconstruction_nats",
                "kl": "kl_nats"}
CALIBRATED = {"p_value": "p_value", "percentile": "percentile", "is_anomaly": "is_anomaly"}
# Outputs only some score kinds have: the compressed size (kinds with a compressor), the latent distance to the
# nearest training image (fisher-<c>-nn kinds), the latent density's -log (density-<c> kinds). Elsewhere that
# endpoint gives null; here they are left out.
PER_KIND = {"complexity_bits": "complexity_bits", "neighbour_distance": "neighbour_distance",
            "latent_density": "latent_density_nats"}
# The latent output a per-kind output comes from: offered when the kind needs it.
PER_KIND_LATENT = {"neighbour_distance": "latent_nn", "latent_density": "latent_log_density"}

# (batcher, served model, input arrays, parameters, deadline, abandoned) -> (output arrays, response parameters)
Run = Callable[[Batcher, ServedModel, Dict[str, np.ndarray], Any, float, Awaitable],
               Awaitable[Tuple[Dict[str, np.ndarray], Parameters]]]


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatypes: Tuple[str, ...]  # accepted; the first is the one the metadata states
    shape: Tuple[int, ...]  # -1: any size

    def metadata(self) -> dict:
        return {"name": self.name, "datatype": self.datatypes[0], "shape": list(self.shape)}


@dataclass(frozen=True)
class ProtocolModel:
    name: str
    inputs: Tuple[TensorSpec, ...]
    outputs: Tuple[TensorSpec, ...]
    run: Run
    # (served model, limits, the request's parameters) -> the model's own parameters, checked
    parameters: Callable[[ServedModel, Settings, Parameters], Any] = lambda served, limits, given: None

    def offered(self, parameters: Any) -> List[str]:
        """The outputs a request with these (checked) parameters can have."""
        has = getattr(parameters, "has", None)
        return [spec.name for spec in self.outputs if has is None or has(spec.name)]

    def metadata(self) -> dict:
        return {"name": self.name, "versions": [VERSION], "platform": PLATFORM,
                "inputs": [t.metadata() for t in self.inputs], "outputs": [t.metadata() for t in self.outputs]}


@dataclass(frozen=True)
class Prepared:
    request: InferRequest
    arrays: Dict[str, np.ndarray]  # the inputs, as the kernels take them
    parameters: Any  # the model's own request parameters, checked
    outputs: List[str]  # the outputs to send, in order


@dataclass(frozen=True)
class ScoreParams:
    kind: scoring.ScoreKind
    k: int
    alpha: float
    tail: str

    @property
    def calibrated(self) -> bool:
        return scoring.applies(self.kind.calibration, self.k)

    def has(self, output: str) -> bool:
        """Whether a score with these parameters has ``output`` (the calibrated and per-kind ones may not)."""
        if output in CALIBRATED:
            return self.calibrated
        if output == "complexity_bits":
            return self.kind.compressor is not None
        if output in PER_KIND_LATENT:
            return PER_KIND_LATENT[output] in self.kind.latent_needs
        return True


def model(info: ModelInfo, name: str, version: Optional[str] = None) -> ProtocolModel:
    """The model called ``name`` (at ``version``, when given); UnknownModel (404) otherwise."""
    known(name, version)
    return _models(info)[name]


def known(name: str, version: Optional[str] = None) -> None:
    """UnknownModel (404) unless this server serves ``name`` (at ``version``, when given)."""
    if name not in MODEL_NAMES:
        raise UnknownModel(f"no model {name!r}; this server serves {list(MODEL_NAMES)}")
    if version is not None and version != VERSION:
        raise UnknownModel(f"model {name!r} has no version {version!r}; it has [{VERSION!r}]")


@lru_cache(maxsize=4)
def _models(info: ModelInfo) -> Dict[str, ProtocolModel]:
    image, latent = (-1, info.channels, info.height, info.width), (-1, info.latent_dim)
    vector = (-1,)
    scores = tuple(TensorSpec(name, ("FP64",), vector) for name in SCORE_FIELDS)
    return {
        "encoder": ProtocolModel("encoder", (TensorSpec("images", IMAGES, image),),
                                 (TensorSpec("mu", ("FP32",), latent), TensorSpec("logvar", ("FP32",), latent)),
                                 _encode),
        "decoder": ProtocolModel("decoder", (TensorSpec("z", LATENTS, latent),),
                                 (TensorSpec("pixels", ("FP32",), image),), _decode),
        "scorer": ProtocolModel("scorer", (TensorSpec("images", IMAGES, image),),
                                scores + (TensorSpec("p_value", ("FP64",), vector),
                                          TensorSpec("percentile", ("FP64",), vector),
                                          TensorSpec("is_anomaly", ("BOOL",), vector))
                                + tuple(TensorSpec(name, ("FP64",), vector) for name in PER_KIND),
                                _score, _score_parameters),
    }


def prepare(limits: Settings, served: ServedModel, model_: ProtocolModel, body: bytes, header_length: Optional[str],
            content_encoding: Optional[str] = None) -> Prepared:
    """A request body -> everything the model needs, every check made before any model work (CPU-bound for a
    large body: the route runs it in the thread pool then)."""
    body = decoded_body(body, content_encoding, limits.max_body_bytes)
    request = parse_request(body, header_length)
    wanted = {spec.name: spec for spec in model_.inputs}
    unknown = sorted(set(request.inputs) - set(wanted))
    missing = sorted(set(wanted) - set(request.inputs))
    if unknown or missing:
        raise InvalidTensor(f"model {model_.name!r} takes inputs {sorted(wanted)}; "
                            + (f"missing {missing}" if missing else f"got unknown {unknown}"))
    parameters = model_.parameters(served, limits, request.parameters)
    offered = model_.offered(parameters)
    outputs = offered if request.outputs is None else list(request.outputs)
    for name in outputs:
        if name not in offered:
            why = ""
            if name in CALIBRATED:
                why = (f"; p_value, percentile and is_anomaly need the calibration's K "
                       f"({getattr(parameters.kind.calibration, 'k', None)})")
            elif name in PER_KIND:
                why = f"; score kind {parameters.kind.name!r} has none"
            raise InvalidTensor(f"model {model_.name!r} has no output {name!r} here{why}; it offers {offered}")
    arrays = {name: _rows(request.inputs[name], spec, limits) for name, spec in wanted.items()}
    return Prepared(request, arrays, parameters, outputs)


def deadline(call_deadline: float, parameters: Parameters) -> float:
    """The request's deadline: X-Request-Timeout's (or the server's), lowered by Triton's ``timeout``
    parameter (microseconds) when given."""
    timeout = parameters.get("timeout")
    if timeout is None:
        return call_deadline
    if type(timeout) is not int or timeout < 1:
        raise InvalidTensor(f"parameters.timeout must be a positive number of microseconds, got {timeout!r}")
    return min(call_deadline, time.monotonic() + timeout / 1e6)


# -- inputs ---------------------------------------------------------------------------------------------------
def _rows(tensor: InferInput, spec: TensorSpec, settings: Settings) -> np.ndarray:
    """An input checked against its spec and the server's limits, before any element is converted, then as the
    kernel takes it: uint8 images or float32 latents."""
    if tensor.datatype not in spec.datatypes:
        raise InvalidTensor(f"input {tensor.name!r} takes {' or '.join(spec.datatypes)}, not {tensor.datatype}")
    shape = tensor.shape
    if len(shape) != len(spec.shape) or any(want not in (-1, got) for want, got in zip(spec.shape, shape)):
        raise InvalidTensor(f"input {tensor.name!r} has shape {list(shape)}; this model takes {list(spec.shape)}")
    if shape[0] == 0:
        raise InvalidTensor(f"input {tensor.name!r} has no rows")
    if shape[0] > settings.max_rows:
        raise RequestTooLarge(f"{shape[0]} rows in one request; the limit is {settings.max_rows}")
    if len(shape) == 4 and shape[0] * shape[2] * shape[3] > settings.max_request_pixels:
        raise RequestTooLarge(f"{shape[0] * shape[2] * shape[3]} pixels in one request; the limit is "
                              f"{settings.max_request_pixels}")
    array = tensor.as_numpy()
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    if not np.isfinite(array).all():
        raise InvalidTensor(f"input {tensor.name!r} has values that are not finite in float32")
    if len(shape) == 2:
        return np.ascontiguousarray(array)
    low, high = float(array.min()), float(array.max())
    if low < 0.0 or high > 1.0:
        raise InvalidTensor(f"input {tensor.name!r}: FP32 pixels must lie in [0, 1], got [{low:g}, {high:g}]; "
                            "send UINT8 for 0..255")
    return codecs.to_uint8(array)


def _score_parameters(served: ServedModel, limits: Settings, given: Parameters) -> ScoreParams:
    """/anomaly-score's query parameters, as request parameters: k, alpha, score, tail."""
    k = given.get("k", served.info.score_k)
    if type(k) is not int or k < 1:
        raise InvalidTensor(f"parameters.k must be a positive integer, got {k!r}")
    if k > limits.max_k:
        raise RequestTooLarge(f"k={k} is over the limit of {limits.max_k}")
    alpha = given.get("alpha", 0.01)
    if type(alpha) not in (int, float) or not 0.0 < alpha < 1.0:
        raise InvalidTensor(f"parameters.alpha must be a number in (0, 1), got {alpha!r}")
    tail = given.get("tail", "upper")
    if tail not in TAILS:
        raise InvalidTensor(f"parameters.tail must be one of {list(TAILS)}, got {tail!r}")
    score = given.get("score")
    if score is not None and not isinstance(score, str):
        raise InvalidTensor(f"parameters.score must be a score kind's name, got {score!r}")
    return ScoreParams(served.score_kinds.get(score), k, float(alpha), tail)


# -- running --------------------------------------------------------------------------------------------------
async def _encode(batcher: Batcher, served: ServedModel, arrays: Dict[str, np.ndarray], params: None,
                  deadline: float, abandoned: Awaitable) -> Tuple[Dict[str, np.ndarray], Parameters]:
    return await batcher.submit("encode", arrays["images"], deadline=deadline, abandoned=abandoned,
                                runner=served.runtime), {}


async def _decode(batcher: Batcher, served: ServedModel, arrays: Dict[str, np.ndarray], params: None,
                  deadline: float, abandoned: Awaitable) -> Tuple[Dict[str, np.ndarray], Parameters]:
    return await batcher.submit("decode", arrays["z"], deadline=deadline, abandoned=abandoned,
                                runner=served.runtime), {}


async def _score(batcher: Batcher, served: ServedModel, arrays: Dict[str, np.ndarray], params: ScoreParams,
                 deadline: float, abandoned: Awaitable) -> Tuple[Dict[str, np.ndarray], Parameters]:
    """As /anomaly-score: the score kernel, the kind's compressed sizes beside it, then scoring's rows, so the
    numbers are that endpoint's; they become one vector per field."""
    rows, summary = await score_images(batcher, served, arrays["images"], params.kind, k=params.k,
                                       alpha=params.alpha, tail=params.tail, deadline=deadline, abandoned=abandoned)
    fields = {name: field for name, field in {**SCORE_FIELDS, **CALIBRATED, **PER_KIND}.items() if params.has(name)}
    arrays = {name: _column(rows, field) for name, field in fields.items()}
    parameters = {"score": params.kind.name, "k": params.k, **{
        ("calibration_" + key if key in ("n", "k") else key): value
        for key, value in summary.items() if value is not None  # a parameter is a bool, number or string
    }}
    return arrays, parameters


def _column(rows: List[dict], field: str) -> np.ndarray:
    if field == "is_anomaly":
        return np.array([row[field] for row in rows], dtype=bool)
    return np.array([math.nan if row[field] is None else row[field] for row in rows], dtype=np.float64)


__all__: Sequence[str] = ("MODEL_NAMES", "PLATFORM", "VERSION", "ProtocolModel", "Prepared", "TensorSpec",
                          "deadline", "known", "model", "prepare")
