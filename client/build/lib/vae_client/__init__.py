"""Python client for the VAE service: ``VAEClient`` (blocking) and ``AsyncVAEClient`` (asyncio, same methods).

    with VAEClient(base_url="http://127.0.0.1:8000") as vae:
        vae.wait_until_ready(60)
        mu = vae.encode(images).mu  # a PIL image, encoded bytes, a list of either, or a uint8 numpy batch
        frames = vae.interpolate(image_a, image_b, steps=8)
        edits = vae.edit(images, direction="class:3", strengths=[0, 1, 2])  # z' = mu + strength * v

Every result of a model names the artifact that computed it, ``model_sha256`` (the server's X-Model-Sha256):
``Encoding``, ``Samples``, ``AnomalyResult``, ``Edits``, ``ComputedDirection``, and the ``ImageList`` and
``PixelArray`` that ``decode`` and friends return (a list and an ndarray with that one attribute more), so
answers from before and after a reload can be told apart.

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
import time
from typing import Any, Optional, Sequence, Tuple, Union

import httpx
import numpy as np

from vae_client._wire import (  # the public names are this module's too
    NPY, RETRYABLE, AnomalyResult, APIError, BadRequest, ComputedDirection, Direction, Edits, Encoding, ImageList,
    Images, Overloaded, PixelArray, ReadyTimeout, Samples, ServerError, Steps, TransportError, Unauthorized,
    VAEError, _anomaly,
    _base64, _Call, _computed, _directions, _edit_body, _edits, _encoding, _image_body, _json, _latents, _pixels,
    _ready, _retry_after, _samples,
)

__all__ = ["APIError", "AnomalyResult", "AsyncVAEClient", "BadRequest", "ComputedDirection", "Direction", "Edits",
           "Encoding", "ImageList", "Overloaded", "PixelArray", "ReadyTimeout", "Samples", "ServerError",
           "TransportError", "Unauthorized", "VAEClient", "VAEError"]


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
        """Latents, (D,) or (N, D) -> ``ImageList`` of PIL images (8-bit, the model's mode)."""
        return self._send(_pixels("/decode", False, json=_latents(z)))

    def decode_array(self, z: Any):
        """Latents -> ``PixelArray``, float32 pixel means in [0, 1], (N, C, H, W)."""
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

    def reload(self, path: Optional[str] = None):
        """Have the server serve another artifact (``path`` inside its model directory; None: its configured
        file again) -> dict: sha256, previous_sha256, processes. Never retried: a reload is not idempotent."""
        return self._send(_Call("POST", "/v1/model/reload", {} if path is None else {"json": {"path": path}}, _json),
                          retries=0)

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
