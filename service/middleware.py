"""Pure ASGI middleware: request metrics per endpoint and status, the in-flight and body-size limits, the API key.

Pure ASGI rather than BaseHTTPMiddleware: no extra task per request, and the size limit is enforced while
the body streams in, so an oversized upload is refused without being buffered.
"""

import hmac
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.config import Settings
from service.errors import RequestTooLarge, error_response
from service.inference_models import metrics_endpoint
from service.metrics import Metrics

# Endpoint label values are bounded: any other path is counted as "other".
ENDPOINTS = frozenset({
    "/encode", "/decode", "/sample", "/interpolate", "/anomaly-score",
    "/livez", "/readyz", "/metrics", "/v1/model", "/docs", "/openapi.json", "/",
    "/directions", "/edit", "/directions/compute",  # latent editing (service.routes.edit)
})


class RequestMetrics:
    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 500  # if the app dies before answering, that is what the client sees

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            path = scope["path"]
            # /v2 paths by route template (service.inference_models): model names only when they are ours
            endpoint = path if path in ENDPOINTS else metrics_endpoint(path) or "other"
            labels = (endpoint, str(status))
            self.metrics.requests.labels(*labels).inc()
            self.metrics.request_seconds.labels(*labels).observe(time.perf_counter() - started)


MODEL_ENDPOINTS = frozenset({"/encode", "/decode", "/sample", "/interpolate", "/anomaly-score", "/edit",
                             "/directions/compute"})


def is_model_path(path: str) -> bool:
    """An endpoint that queues model work: ours, and the Open Inference Protocol's infer routes."""
    return path in MODEL_ENDPOINTS or (path.startswith("/v2/") and path.endswith("/infer"))


class InFlightLimit:
    """At most ``limit`` model requests in flight; the next get 503 + Retry-After before their body is read.

    The batcher's queue bounds rows, but rows are only counted once a body is parsed: without this, a flood
    of requests piles up in the event loop itself (the unbounded queue other servers are known for).
    """

    def __init__(self, app: ASGIApp, limit: int, metrics: Metrics) -> None:
        self.app, self.limit, self.metrics = app, limit, metrics
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not is_model_path(scope["path"]):
            return await self.app(scope, receive, send)
        if self.in_flight >= self.limit:
            self.metrics.rejections.labels("overloaded").inc()
            response = error_response(503, "overloaded", f"{self.in_flight} requests in flight; retry shortly",
                                      headers={"Retry-After": "1"}, path=scope["path"])
            return await response(scope, receive, send)
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int, metrics: Metrics) -> None:
        self.app, self.max_bytes, self.metrics = app, max_bytes, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            self.metrics.rejections.labels("too_large").inc()
            response = error_response(413, "too_large", f"body of {int(declared)} bytes; the limit is {self.max_bytes}",
                                      path=scope["path"])
            return await response(scope, receive, send)
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:  # chunked bodies declare no length: count as they stream
                    self.metrics.rejections.labels("too_large").inc()
                    raise RequestTooLarge(f"body over the limit of {self.max_bytes} bytes")
            return message

        await self.app(scope, limited_receive, send)


# An orchestrator's probes carry no credentials (the Open Inference Protocol's health routes are probes too).
PROBES = frozenset({"/livez", "/readyz", "/v2/health/live", "/v2/health/ready"})


class ApiKeyRequired:
    """With ``settings.api_key`` set, every request but the probes, ``public`` (the page at / and its files) and
    /metrics with ``metrics_public`` needs that key in X-API-Key, else 401 before the app sees it.

    Middleware, not a route dependency: it also guards what no router of ours declares (the OpenAPI document,
    the Swagger UI and its assets, unknown paths). It must sit inside CORS, which answers a browser's
    preflight itself: a preflight never carries the key.
    """

    def __init__(self, app: ASGIApp, settings: Settings, metrics: Metrics, public: frozenset = frozenset()) -> None:
        self.app, self.metrics = app, metrics
        self.key = settings.api_key.get_secret_value().encode() if settings.api_key is not None else None
        self.open = PROBES | public | ({"/metrics"} if settings.metrics_public else set())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.key is None or scope["type"] != "http" or scope["path"] in self.open:
            return await self.app(scope, receive, send)
        given = next((value for name, value in scope["headers"] if name == b"x-api-key"), None)
        # Constant-time comparison: the time taken says nothing about how much of the key matched.
        if given is not None and hmac.compare_digest(given, self.key):
            return await self.app(scope, receive, send)
        self.metrics.rejections.labels("unauthorized").inc()
        response = error_response(401, "unauthorized", "missing or wrong X-API-Key",
                                  headers={"WWW-Authenticate": "ApiKey"}, path=scope["path"])
        await response(scope, receive, send)
