"""Pure ASGI middleware: request metrics per endpoint and status, the in-flight and body-size limits, the API key.

Pure ASGI rather than BaseHTTPMiddleware: no extra task per request, and the size limit is enforced while
the body streams in, so an oversized upload is refused without being buffered. Which requests are model work,
probes or the page, and what their metrics label is, each asks the app's route table (``service.api.routing``).
"""

import hmac
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.errors import error_response
from service.api.routing import Role, RouteTable
from service.config import Settings
from service.core.errors import RequestTooLarge
from service.core.metrics import Metrics


class RequestMetrics:
    def __init__(self, app: ASGIApp, metrics: Metrics, routes: RouteTable) -> None:
        self.app, self.metrics, self.routes = app, metrics, routes

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
            route = self.routes.find(scope["path"])
            labels = (route.label, str(status), route.role.value)
            self.metrics.requests.labels(*labels).inc()
            self.metrics.request_seconds.labels(*labels).observe(time.perf_counter() - started)


MODEL_HEADER = b"x-model-sha256"


class ModelHeader:
    """``X-Model-Sha256`` on every answer of a request that a model took on: the sha256 of the artifact that
    answered it (``ModelCall`` records it when it reads the model), so a client can tell the answers of two
    models apart across a reload."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_model(message: Message) -> None:
            if message["type"] == "http.response.start":
                sha256 = scope.get("state", {}).get("model_sha256")
                if sha256 is not None:
                    message = {**message, "headers": [*message.get("headers", []), (MODEL_HEADER, sha256.encode())]}
            await send(message)

        await self.app(scope, receive, send_with_model)


class InFlightLimit:
    """At most ``limit`` model requests in flight; the next get 503 + Retry-After before their body is read.

    The batcher's queue bounds rows, but rows are only counted once a body is parsed: without this, a flood
    of requests piles up in the event loop itself (the unbounded queue other servers are known for).
    """

    def __init__(self, app: ASGIApp, limit: int, metrics: Metrics, routes: RouteTable) -> None:
        self.app, self.limit, self.metrics, self.routes = app, limit, metrics, routes
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.routes.find(scope["path"]).role is not Role.MODEL:
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


class ApiKeyRequired:
    """With ``settings.api_key`` set, every request but the probes (an orchestrator's probes carry no
    credentials), the page at / with its files, and /metrics with ``metrics_public`` needs that key in
    X-API-Key, else 401 before the app sees it.

    Middleware, not a route dependency: it also guards what no router of ours declares (the OpenAPI document,
    the Swagger UI and its assets, unknown paths). It must sit inside CORS, which answers a browser's
    preflight itself: a preflight never carries the key.
    """

    def __init__(self, app: ASGIApp, settings: Settings, metrics: Metrics, routes: RouteTable) -> None:
        self.app, self.metrics, self.routes = app, metrics, routes
        self.key = settings.api_key.get_secret_value().encode() if settings.api_key is not None else None
        self.metrics_public = settings.metrics_public

    def _open(self, path: str) -> bool:
        route = self.routes.find(path)
        return route.role in (Role.PROBE, Role.PAGE) or (self.metrics_public and route.label == "/metrics")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.key is None or scope["type"] != "http" or self._open(scope["path"]):
            return await self.app(scope, receive, send)
        given = next((value for name, value in scope["headers"] if name == b"x-api-key"), None)
        # Constant-time comparison: the time taken says nothing about how much of the key matched.
        if given is not None and hmac.compare_digest(given, self.key):
            return await self.app(scope, receive, send)
        self.metrics.rejections.labels("unauthorized").inc()
        response = error_response(401, "unauthorized", "missing or wrong X-API-Key",
                                  headers={"WWW-Authenticate": "ApiKey"}, path=scope["path"])
        await response(scope, receive, send)
