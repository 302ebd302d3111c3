"""The client's side of the wire format: its exceptions, result types, how a response becomes a result
(or raises), and how arguments become request bodies. ``vae_client`` drives these over httpx and
re-exports the public names; no torch, like the client."""

import base64
import email.utils
import io
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Generator, List, Optional, Sequence, Union

import httpx
import numpy as np
from PIL import Image

NPY = "application/x-npy"
RETRYABLE = (429, 503)
ImageLike = Union[Image.Image, bytes]
Images = Union[ImageLike, Sequence[ImageLike], np.ndarray]  # numpy: uint8 (H, W), (N, H, W) or (N, C, H, W)


class VAEError(Exception):
    """Base class of every error this client raises."""


class APIError(VAEError):
    def __init__(self, status: int, code: str, message: str, error_id: Optional[str] = None,
                 retry_after: Optional[float] = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message, self.error_id = status, code, message, error_id
        self.retry_after = retry_after  # seconds, from Retry-After; set on Overloaded


class BadRequest(APIError):
    """4xx: the request was refused; sending it again will not help."""


class Unauthorized(APIError):
    """401: missing or wrong API key."""


class Overloaded(APIError):
    """503 or 429: try again after ``retry_after`` seconds (``retries=`` does so automatically)."""


class ServerError(APIError):
    """5xx: the server failed; ``error_id`` names the cause in its log."""


class TransportError(VAEError):
    """No HTTP answer: connection refused or reset, timeout, protocol error."""


class ReadyTimeout(VAEError, TimeoutError):
    """The service did not become ready in time."""


@dataclass
class Encoding:
    mu: np.ndarray  # (N, D) float32 posterior means
    logvar: np.ndarray  # (N, D) float32
    z: Optional[np.ndarray] = None  # (N, D) float32 posterior sample, with encode(sample=True)
    seed: Optional[int] = None  # the seed z was drawn with
    model_sha256: Optional[str] = None  # the artifact that answered (X-Model-Sha256)


@dataclass
class Samples:
    images: List[Image.Image]
    z: np.ndarray  # (n, D) float32 prior draws the images decode
    seed: int
    model_sha256: Optional[str] = None  # the artifact that answered (X-Model-Sha256)


@dataclass
class AnomalyResult:
    """Arrays with one float64 entry per image; NaN where the server sent null: p_value and percentile when
    uncalibrated (no calibration of the kind, or ``k`` other than the calibration's K)."""

    score_nats: np.ndarray  # the requested score kind, higher = stranger; p_value and is_anomaly refer to it
    complexity_bits: np.ndarray  # compressed input size in bits for nll-minus-<compressor> kinds, else NaN
    neighbour_distance: np.ndarray  # latent distance to the nearest training image for fisher-<c>-nn kinds, else NaN
    latent_density_nats: np.ndarray  # -log density of the latent features for density-<c> kinds, else NaN
    nll_nats: np.ndarray  # importance-weighted negative log-likelihood
    nll_bits_per_dim: np.ndarray
    nll_se_nats: np.ndarray  # Monte Carlo standard error of nll_nats
    ess: np.ndarray  # effective sample size of the K importance weights
    elbo_nats: np.ndarray
    reconstruction_nats: np.ndarray
    kl_nats: np.ndarray
    p_value: np.ndarray  # conformal p-value against the artifact's calibration scores; NaN when uncalibrated
    percentile: np.ndarray
    is_anomaly: Optional[np.ndarray]  # bool (p_value <= alpha); None when uncalibrated
    score: str  # the score kind: nll, nll-minus-<compressor>, fisher-<compressor>[-nn], density-<compressor>
    k: int  # importance samples used
    calibration: Dict[str, Any]  # calibrated, n, k (the calibration's), alpha, tail, threshold_nats
    model_sha256: Optional[str] = None  # the artifact that answered: its calibration made the p-values


@dataclass
class Direction:
    """A stored latent direction (``GET /directions``); edits are z' = mu + strength * vector."""

    name: str  # class:<label>, pixel:<statistic>, or a custom name
    kind: str  # class, pixel or custom
    description: str
    n_pos: int  # images with the attribute it was built from
    n_neg: int  # images without it
    norm: float  # length of the vector, in latent units
    auroc: Optional[float]  # held-out AUROC of <mu, vector>; None when unchecked
    vector: Optional[np.ndarray] = None  # (D,) float64, with directions(vectors=True)


@dataclass
class Edits:
    strengths: np.ndarray  # (S,) float64, raw latent units of the vector
    z: np.ndarray  # (N, S, D) float32: z' = mu + strength * vector per input and strength
    images: List[List[Image.Image]]  # images[input][strength]
    model_sha256: Optional[str] = None  # the artifact that answered (X-Model-Sha256)


@dataclass
class ComputedDirection:
    """A direction computed from example images (``POST /directions/compute``); pass ``vector`` to ``edit``."""

    vector: np.ndarray  # (D,) float64: mean mu of the positives minus that of the negatives
    norm: float
    n_pos: int
    n_neg: int
    auroc: Optional[float]  # on held-out examples; None with fewer than 2 on a side
    model_sha256: Optional[str] = None  # the artifact whose latent space it is in


class ImageList(list):
    """A list of PIL images, and the sha256 of the artifact that made them (``model_sha256``)."""

    model_sha256: Optional[str] = None


class PixelArray(np.ndarray):
    """A float32 array of pixel means, and the sha256 of the artifact that computed it (``model_sha256``)."""

    model_sha256: Optional[str] = None

    def __array_finalize__(self, obj: Any) -> None:
        self.model_sha256 = getattr(obj, "model_sha256", None)


def model_sha256(response: httpx.Response) -> Optional[str]:
    """The artifact that answered, as the server names it; None from a server that does not."""
    return response.headers.get("x-model-sha256")


# AnomalyResult's per-image float columns: what _anomaly reads from every row of the response.
_FLOAT_COLUMNS = ("score_nats", "complexity_bits", "neighbour_distance", "latent_density_nats", "nll_nats",
                  "nll_bits_per_dim", "nll_se_nats", "ess", "elbo_nats", "reconstruction_nats", "kl_nats", "p_value",
                  "percentile")


@dataclass(frozen=True)
class _Call:
    """One HTTP request, and how its response becomes the method's result (or raises)."""

    method: str
    url: str
    kwargs: Dict[str, Any]  # for httpx's request()
    parse: Callable[[httpx.Response], Any]


Steps = Generator[Union[_Call, float], Any, Any]  # yields a _Call (gets its response) or seconds to sleep


def _raise_for_status(response: httpx.Response) -> None:
    status = response.status_code
    if status < 400:
        return
    try:
        error = response.json()["error"]
        code, message, error_id = str(error["code"]), str(error["message"]), error.get("error_id")
    except (ValueError, KeyError, TypeError):  # not the service's error body (a proxy's page, say)
        code, message, error_id = "http_error", response.text[:200] or response.reason_phrase, None
    kind = (Overloaded if status in RETRYABLE else Unauthorized if status == 401
            else BadRequest if status < 500 else ServerError)
    raise kind(status, code, message, error_id, _retry_after(response) if kind is Overloaded else None)


def _retry_after(response: httpx.Response) -> Optional[float]:
    value = response.headers.get("retry-after", "")
    try:
        return max(0.0, float(value))
    except ValueError:  # the HTTP-date form, or garbage
        when = email.utils.parsedate_to_datetime(value) if email.utils.parsedate(value) else None
        return max(0.0, when.timestamp() - time.time()) if when else None


def _json(response: httpx.Response) -> Any:
    _raise_for_status(response)
    return response.json()


def _npy(response: httpx.Response) -> np.ndarray:
    _raise_for_status(response)
    return np.load(io.BytesIO(response.content), allow_pickle=False)


def _ready(response: httpx.Response) -> bool:
    if response.status_code == 503:  # warming up or draining: an answer, not an error
        return False
    _raise_for_status(response)
    return True


def _pngs(items: List[str]) -> List[Image.Image]:
    images = [Image.open(io.BytesIO(base64.b64decode(b64))) for b64 in items]
    for image in images:
        image.load()  # decode now, not lazily on first use
    return images


def _images(response: httpx.Response) -> ImageList:
    images = ImageList(_pngs(_json(response)["images"]))
    images.model_sha256 = model_sha256(response)
    return images


def _pixel_array(response: httpx.Response) -> PixelArray:
    pixels = _npy(response).view(PixelArray)
    pixels.model_sha256 = model_sha256(response)
    return pixels


def _encoding(response: httpx.Response) -> Encoding:
    if response.headers.get("content-type", "").startswith(NPY):
        stacked = _npy(response)  # (N, 2, D): mu and logvar stacked
        return Encoding(np.ascontiguousarray(stacked[:, 0]), np.ascontiguousarray(stacked[:, 1]),
                        model_sha256=model_sha256(response))
    body = _json(response)
    z = None if body["z"] is None else np.asarray(body["z"], dtype=np.float32)
    return Encoding(np.asarray(body["mu"], np.float32), np.asarray(body["logvar"], np.float32), z, body["seed"],
                    model_sha256(response))


def _samples(response: httpx.Response) -> Samples:
    body = _json(response)
    return Samples(_pngs(body["images"]), np.asarray(body["z"], dtype=np.float32), body["seed"],
                   model_sha256(response))


def _anomaly(response: httpx.Response) -> AnomalyResult:
    body = _json(response)
    rows = body["scores"]
    columns = {n: np.array([np.nan if r.get(n) is None else r[n] for r in rows], dtype=np.float64)
               for n in _FLOAT_COLUMNS}
    flags = [r["is_anomaly"] for r in rows]
    is_anomaly = None if None in flags else np.array(flags, dtype=bool)
    return AnomalyResult(**columns, is_anomaly=is_anomaly, score=body["score"], k=body["k"],
                         calibration=body["calibration"], model_sha256=model_sha256(response))


def _directions(response: httpx.Response) -> List[Direction]:
    return [Direction(row["name"], row["kind"], row["description"], row["n_pos"], row["n_neg"], row["norm"],
                      row["auroc"], None if row.get("vector") is None else np.asarray(row["vector"], np.float64))
            for row in _json(response)["directions"]]


def _edits(response: httpx.Response) -> Edits:
    body = _json(response)
    return Edits(np.asarray(body["strengths"], np.float64),
                 np.asarray([row["z"] for row in body["edits"]], np.float32).reshape(len(body["edits"]),
                                                                                     len(body["strengths"]), -1),
                 [_pngs(row["images"]) for row in body["edits"]], model_sha256(response))


def _computed(response: httpx.Response) -> ComputedDirection:
    body = _json(response)
    return ComputedDirection(np.asarray(body["vector"], np.float64), body["norm"], body["n_pos"], body["n_neg"],
                             body["auroc"], model_sha256(response))


def _png_files(images: Images) -> List[bytes]:
    """Images of any accepted form -> PNG (or the given encoded) bytes, one per image."""
    if isinstance(images, np.ndarray):
        array = images if images.dtype == np.uint8 else np.clip(np.rint(images * 255.0), 0, 255).astype(np.uint8)
        if array.ndim == 2:
            array = array[None]
        if array.ndim == 4:  # (N, C, H, W) -> (N, H, W) or (N, H, W, C), Pillow's layouts
            array = array[:, 0] if array.shape[1] == 1 else array.transpose(0, 2, 3, 1)
        images = [Image.fromarray(np.ascontiguousarray(image)) for image in array]
    items = [images] if isinstance(images, (Image.Image, bytes, bytearray)) else list(images)
    if not items:
        raise ValueError("images is empty")
    files = []
    for index, item in enumerate(items):
        if isinstance(item, Image.Image):
            buffer = io.BytesIO()
            # PNG has no float or CMYK modes; the server would convert those to L/RGB anyway.
            ok = item.mode in ("1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16")
            (item if ok else item.convert("RGB")).save(buffer, format="PNG")
            item = buffer.getvalue()
        elif not isinstance(item, (bytes, bytearray)):
            raise TypeError(f"images[{index}] is a {type(item).__name__}; expected a PIL image or encoded bytes")
        files.append(bytes(item))
    return files


def _base64(images: Images) -> List[str]:
    return [base64.b64encode(data).decode("ascii") for data in _png_files(images)]


def _edit_body(images: Optional[Images], z: Any, direction: Optional[str], vector: Any,
               strengths: Optional[Sequence[float]]) -> Dict[str, Any]:
    if (images is None) == (z is None):
        raise TypeError("give exactly one of images or z")
    if (direction is None) == (vector is None):
        raise TypeError("give exactly one of direction (a stored name) or vector")
    body: Dict[str, Any] = {"images": _base64(images)} if z is None else _latents(z)
    if direction is not None:
        body["direction"] = direction
    else:
        body["vector"] = np.asarray(vector, dtype=np.float64).ravel().tolist()
    if strengths is not None:
        body["strengths"] = [float(s) for s in np.atleast_1d(np.asarray(strengths, dtype=np.float64))]
    return body


def _image_body(images: Images) -> Dict[str, Any]:
    """Images -> httpx keyword arguments: numpy as one .npy body (the fast path), anything else as multipart."""
    if isinstance(images, np.ndarray):
        if images.dtype.kind not in "uif":
            raise TypeError(f"numpy images must be uint8 (0..255) or float (0..1), got dtype {images.dtype}")
        buffer = io.BytesIO()
        np.save(buffer, images, allow_pickle=False)
        return {"content": buffer.getvalue(), "headers": {"Content-Type": NPY}}
    return {"files": [("file", (f"image{index}", data, "application/octet-stream"))
                      for index, data in enumerate(_png_files(images))]}


def _latents(z: Any) -> Dict[str, List[List[float]]]:
    array = np.atleast_2d(np.asarray(z, dtype=np.float64))  # float32 -> float64 -> JSON is exact
    if array.ndim != 2 or array.size == 0:
        raise ValueError(f"z must be one latent vector or an (N, D) batch, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError("z has NaN or infinite values")
    return {"z": array.tolist()}


def _pixels(url: str, array: bool, **kwargs: Any) -> _Call:
    """/decode, /sample, /interpolate: base64 PNGs in JSON, or with ``array`` float32 pixel means as npy."""
    if array:
        kwargs["headers"] = {**kwargs.get("headers", {}), "Accept": NPY}
    return _Call("POST", url, kwargs, _pixel_array if array else _images)
