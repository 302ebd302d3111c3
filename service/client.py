"""Python client for the VAE service: ``VAEClient`` (blocking) and ``AsyncVAEClient`` (asyncio, same methods).

    with VAEClient(base_url="http://127.0.0.1:8000") as vae:
        vae.wait_until_ready(60)
        mu = vae.encode(images).mu  # a PIL image, encoded bytes, a list of either, or a uint8 numpy batch
        frames = vae.interpolate(image_a, image_b, steps=8)
        edits = vae.edit(images, direction="class:3", strengths=[0, 1, 2])  # z' = mu + strength * v

Each method is written once, as a generator of steps (a ``_Call`` to send, or seconds to sleep) that builds
the request and parses the answer; the two classes differ only in ``_drive``, which performs the steps with
httpx's blocking or async transport. Needs numpy, httpx and Pillow only (no torch).

Exceptions, all ``VAEError``:
    APIError         the server answered with an error: ``status``, ``code``, ``message``, ``error_id``
      BadRequest     a 4xx other than 401 and 429: invalid image, wrong latent size, too large ...
      Unauthorized   401: the ``api_key`` is missing or wrong
      Overloaded     503 or 429 (queue full, warming up, draining): ``retry_after`` seconds, or None
      ServerError    another 5xx; quote ``error_id`` when reporting it
    TransportError   no answer (refused, timed out, broken); ``__cause__`` is the httpx exception
    ReadyTimeout     ``wait_until_ready`` ran out of time; also a ``TimeoutError``
"""

import asyncio
import base64
import email.utils
import io
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Generator, List, Optional, Sequence, Tuple, Union

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


@dataclass
class Samples:
    images: List[Image.Image]
    z: np.ndarray  # (n, D) float32 prior draws the images decode
    seed: int


@dataclass
class AnomalyResult:
    """Arrays with one float64 entry per image; NaN where the server sent null: p_value and percentile when
    uncalibrated (no calibration of the kind, or ``k`` other than the calibration's K)."""

    score_nats: np.ndarray  # the requested score kind, higher = stranger; p_value and is_anomaly refer to it
    complexity_bits: np.ndarray  # compressed input size in bits for nll-minus-<compressor> kinds, else NaN
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
    score: str  # the score kind: nll, or nll-minus-<compressor>
    k: int  # importance samples used
    calibration: Dict[str, Any]  # calibrated, n, k (the calibration's), alpha, tail, threshold_nats


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


@dataclass
class ComputedDirection:
    """A direction computed from example images (``POST /directions/compute``); pass ``vector`` to ``edit``."""

    vector: np.ndarray  # (D,) float64: mean mu of the positives minus that of the negatives
    norm: float
    n_pos: int
    n_neg: int
    auroc: Optional[float]  # on held-out examples; None with fewer than 2 on a side


# AnomalyResult's per-image float columns: what _anomaly reads from every row of the response.
_FLOAT_COLUMNS = ("score_nats", "complexity_bits", "nll_nats", "nll_bits_per_dim", "nll_se_nats", "ess", "elbo_nats",
                  "reconstruction_nats", "kl_nats", "p_value", "percentile")


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


def _images(response: httpx.Response) -> List[Image.Image]:
    return _pngs(_json(response)["images"])


def _encoding(response: httpx.Response) -> Encoding:
    if response.headers.get("content-type", "").startswith(NPY):
        stacked = _npy(response)  # (N, 2, D): mu and logvar stacked
        return Encoding(np.ascontiguousarray(stacked[:, 0]), np.ascontiguousarray(stacked[:, 1]))
    body = _json(response)
    z = None if body["z"] is None else np.asarray(body["z"], dtype=np.float32)
    return Encoding(np.asarray(body["mu"], np.float32), np.asarray(body["logvar"], np.float32), z, body["seed"])


def _samples(response: httpx.Response) -> Samples:
    body = _json(response)
    return Samples(_pngs(body["images"]), np.asarray(body["z"], dtype=np.float32), body["seed"])


def _anomaly(response: httpx.Response) -> AnomalyResult:
    body = _json(response)
    rows = body["scores"]
    columns = {n: np.array([np.nan if r.get(n) is None else r[n] for r in rows], dtype=np.float64)
               for n in _FLOAT_COLUMNS}
    flags = [r["is_anomaly"] for r in rows]
    is_anomaly = None if None in flags else np.array(flags, dtype=bool)
    return AnomalyResult(**columns, is_anomaly=is_anomaly, score=body["score"], k=body["k"],
                         calibration=body["calibration"])


def _directions(response: httpx.Response) -> List[Direction]:
    return [Direction(row["name"], row["kind"], row["description"], row["n_pos"], row["n_neg"], row["norm"],
                      row["auroc"], None if row.get("vector") is None else np.asarray(row["vector"], np.float64))
            for row in _json(response)["directions"]]


def _edits(response: httpx.Response) -> Edits:
    body = _json(response)
    return Edits(np.asarray(body["strengths"], np.float64),
                 np.asarray([row["z"] for row in body["edits"]], np.float32).reshape(len(body["edits"]),
                                                                                     len(body["strengths"]), -1),
                 [_pngs(row["images"]) for row in body["edits"]])


def _computed(response: httpx.Response) -> ComputedDirection:
    body = _json(response)
    return ComputedDirection(np.asarray(body["vector"], np.float64), body["norm"], body["n_pos"], body["n_neg"],
                             body["auroc"])


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
    return _Call("POST", url, kwargs, _npy if array else _images)


class _Operations:
    """The API, written once; ``_drive`` (in each subclass) performs the steps of a method."""

    _http_class: type

    def __init__(self, *, base_url: Union[str, httpx.URL], api_key: Optional[str] = None,
                 timeout: Optional[float] = 30.0, retries: int = 0, max_retry_wait: float = 10.0,
                 transport: Any = None) -> None:
        if not isinstance(base_url, (str, httpx.URL)) or not str(base_url):
            raise ValueError(f"base_url must be a non-empty URL, got {base_url!r}")
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds or None, got {timeout!r}")
        if not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries must be an int >= 0, got {retries!r}")
        if not max_retry_wait >= 0:
            raise ValueError(f"max_retry_wait must be >= 0 seconds, got {max_retry_wait!r}")
        self.retries, self.max_retry_wait = retries, max_retry_wait
        headers = {} if api_key is None else {"X-API-Key": api_key}
        if timeout is not None:  # the server then drops work nobody waits for; it accepts at most an hour
            headers["X-Request-Timeout"] = f"{min(timeout, 3600.0):g}"
        self._http = self._http_class(base_url=base_url, headers=headers, timeout=timeout, transport=transport)

    def _attempts(self, call: _Call, retries: int) -> Steps:
        for attempt in range(retries + 1):
            response = yield call
            if response.status_code not in RETRYABLE or attempt == retries:
                return call.parse(response)
            wait = _retry_after(response)
            yield min(self.max_retry_wait, 0.1 * 2**attempt if wait is None else wait)  # capped

    def _send(self, call: _Call, retries: Optional[int] = None) -> Any:
        return self._drive(self._attempts(call, self.retries if retries is None else retries))

    def _wait(self, timeout: float, interval: float) -> Steps:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if (yield from self._attempts(_Call("GET", "/readyz", {}, _ready), 0)):
                    return None
                why = "/readyz answers 503"
            except TransportError as exc:  # not listening yet
                why = str(exc)
            left = deadline - time.monotonic()
            if left <= 0:
                raise ReadyTimeout(f"not ready after {timeout:g} s: {why}")
            yield min(interval, left)

    def _drive(self, steps: Steps) -> Any:
        raise NotImplementedError  # VAEClient blocks; AsyncVAEClient returns an awaitable

    def encode(self, images: Images, *, sample: bool = False, seed: Optional[int] = None):
        """Images -> ``Encoding``: mu and logvar; with ``sample``, z = mu + sigma * eps drawn with ``seed``."""
        kwargs = _image_body(images)
        if sample:  # z only comes in JSON
            kwargs["params"] = {"sample": "true", **({} if seed is None else {"seed": seed})}
        else:
            kwargs["headers"] = {**kwargs.get("headers", {}), "Accept": NPY}
        return self._send(_Call("POST", "/encode", kwargs, _encoding))

    def decode(self, z: Any):
        """Latents, (D,) or (N, D) -> list of PIL images (8-bit, the model's mode)."""
        return self._send(_pixels("/decode", False, json=_latents(z)))

    def decode_array(self, z: Any):
        """Latents -> float32 pixel means in [0, 1], (N, C, H, W)."""
        return self._send(_pixels("/decode", True, json=_latents(z)))

    def sample(self, n: int, *, seed: Optional[int] = None, temperature: float = 1.0):
        """``n`` draws from the prior -> ``Samples``; the same seed gives the same z and images."""
        body = {"n": n, "seed": seed, "temperature": temperature}
        return self._send(_Call("POST", "/sample", {"json": body}, _samples))

    def interpolate(self, a: Any, b: Any, *, steps: int = 8, method: str = "slerp"):
        """Two images (via their posterior means) or two latent vectors -> ``steps`` PIL frames, ends included."""
        params = {"steps": steps, "method": method}
        latent = [np.ndim(x) == 1 and not isinstance(x, (bytes, bytearray)) for x in (a, b)]
        if all(latent):
            return self._send(_pixels("/interpolate", False, params=params, json=_latents([a, b])))
        if any(latent):
            raise TypeError("a and b must both be images or both be latent vectors")
        pair = np.stack([a, b]) if isinstance(a, np.ndarray) and isinstance(b, np.ndarray) else [a, b]
        return self._send(_pixels("/interpolate", False, params=params, **_image_body(pair)))

    def anomaly_score(self, images: Images, *, k: Optional[int] = None, alpha: float = 0.01, tail: str = "upper",
                      score: Optional[str] = None):
        """Images -> ``AnomalyResult``; ``k`` defaults to the calibration's K (another K: no p-values), ``tail``
        is upper or two-sided, ``score`` a kind from ``model_info()["metadata"]["scoring"]["kinds"]`` (default:
        the artifact's)."""
        params = {"alpha": alpha, "tail": tail, **({} if k is None else {"k": k}),
                  **({} if score is None else {"score": score})}
        return self._send(_Call("POST", "/anomaly-score", {"params": params, **_image_body(images)}, _anomaly))

    def directions(self, *, vectors: bool = False):
        """The artifact's latent directions -> list of ``Direction`` (each with its vector when ``vectors``)."""
        params = {"vectors": "true"} if vectors else {}
        return self._send(_Call("GET", "/directions", {"params": params}, _directions))

    def edit(self, images: Optional[Images] = None, *, z: Any = None, direction: Optional[str] = None,
             vector: Any = None, strengths: Optional[Sequence[float]] = None):
        """Images (edited from their posterior means) or latents ``z``, moved along a stored ``direction`` (a
        name) or a ``vector`` (D,) and decoded -> ``Edits``: z' = mu + strength * vector for each of
        ``strengths`` (raw latent units; default -2, -1, 0, 1, 2)."""
        body = _edit_body(images, z, direction, vector, strengths)
        return self._send(_Call("POST", "/edit", {"json": body}, _edits))

    def edit_array(self, images: Optional[Images] = None, *, z: Any = None, direction: Optional[str] = None,
                   vector: Any = None, strengths: Optional[Sequence[float]] = None):
        """As ``edit``, as float32 pixel means in [0, 1] of shape (N, S, C, H, W)."""
        body = _edit_body(images, z, direction, vector, strengths)
        return self._send(_pixels("/edit", True, json=body))

    def compute_direction(self, positive: Images, negative: Images):
        """Example images with and without an attribute -> ``ComputedDirection`` (its vector goes to ``edit``)."""
        body = {"positive": _base64(positive), "negative": _base64(negative)}
        return self._send(_Call("POST", "/directions/compute", {"json": body}, _computed))

    def model_info(self):
        """The served artifact (dict): device, sha256, image shape, latent_dim, score_k, metadata."""
        return self._send(_Call("GET", "/v1/model", {}, _json))

    def ready(self):
        """True when warm and not draining, False on 503 (one probe, never retried)."""
        return self._send(_Call("GET", "/readyz", {}, _ready), retries=0)

    def wait_until_ready(self, timeout: float = 60.0, *, interval: float = 0.2):
        """Poll /readyz, tolerating refused connections, until ready; ``ReadyTimeout`` after ``timeout`` s."""
        return self._drive(self._wait(timeout, interval))


def _advance(steps: Steps, outcome: Any) -> Tuple[bool, Any]:
    """Give ``steps`` the last step's outcome (a transport failure is raised inside it): (done, next step or result)."""
    try:
        if isinstance(outcome, httpx.TransportError):
            error = TransportError(f"{type(outcome).__name__}: {outcome}")
            error.__cause__ = outcome
            return False, steps.throw(error)
        return False, steps.send(outcome)
    except StopIteration as stop:
        return True, stop.value


class VAEClient(_Operations):
    """Blocking client: ``with VAEClient(base_url=...) as vae``, or call ``close()``."""

    _http_class = httpx.Client

    def _drive(self, steps: Steps) -> Any:
        done, step = _advance(steps, None)
        while not done:
            try:
                if isinstance(step, _Call):
                    outcome = self._http.request(step.method, step.url, **step.kwargs)
                else:
                    outcome = time.sleep(step)
            except httpx.TransportError as exc:
                outcome = exc
            done, step = _advance(steps, outcome)
        return step

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "VAEClient":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


class AsyncVAEClient(_Operations):
    """asyncio client, methods awaited: ``async with AsyncVAEClient(base_url=...) as vae``, or ``aclose()``."""

    _http_class = httpx.AsyncClient

    async def _drive(self, steps: Steps) -> Any:
        done, step = _advance(steps, None)
        while not done:
            try:
                if isinstance(step, _Call):
                    outcome = await self._http.request(step.method, step.url, **step.kwargs)
                else:
                    outcome = await asyncio.sleep(step)
            except httpx.TransportError as exc:
                outcome = exc
            done, step = _advance(steps, outcome)
        return step

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> "AsyncVAEClient":
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.aclose()
