"""What routes receive: the service state, readiness, the API-key check and the request deadline."""

import hmac
import time
from dataclasses import dataclass, field
from typing import Annotated, Optional

from fastapi import Depends, Header, Request

from service.batching import Batcher
from service.codecs import ImageSpec
from service.config import Settings
from service.errors import ModelNotReady, Unauthorized
from service.metrics import Metrics
from service.runtime import ModelRuntime
from service.scoring import Calibration, ScoreKinds


@dataclass
class ServiceState:
    settings: Settings
    metrics: Metrics
    runtime: Optional[ModelRuntime] = None
    batcher: Optional[Batcher] = None
    calibration: Optional[Calibration] = None
    score_kinds: Optional[ScoreKinds] = None  # the artifact's anomaly score kinds; built once from its metadata
    image_spec: Optional[ImageSpec] = None
    warm: bool = False
    failed: Optional[str] = None  # why the model can never become ready (e.g. warm-up crashed)
    draining: bool = False
    started: float = field(default_factory=time.monotonic)

    @property
    def ready(self) -> bool:
        return self.warm and not self.draining and self.batcher is not None


async def get_state(request: Request) -> ServiceState:
    return request.app.state.service


async def ready_state(state: Annotated[ServiceState, Depends(get_state)]) -> ServiceState:
    if not state.ready:
        raise ModelNotReady("the service is draining" if state.draining else "the model is still warming up")
    return state


async def require_api_key(
    state: Annotated[ServiceState, Depends(get_state)],
    x_api_key: Annotated[Optional[str], Header(description="Required when the server has an API key.")] = None,
) -> None:
    expected = state.settings.api_key
    if expected is None:
        return
    # Constant-time comparison: the time taken says nothing about how much of the key matched.
    if x_api_key is None or not hmac.compare_digest(x_api_key.encode(), expected.get_secret_value().encode()):
        state.metrics.rejections.labels("unauthorized").inc()
        raise Unauthorized("missing or wrong X-API-Key")


async def request_deadline(
    state: Annotated[ServiceState, Depends(get_state)],
    x_request_timeout: Annotated[
        Optional[float], Header(gt=0, le=3600, description="Seconds this request may wait; capped by the server.")
    ] = None,
) -> float:
    """Monotonic time after which the request's rows are dropped instead of computed."""
    timeout = state.settings.request_timeout_s
    if x_request_timeout is not None:
        timeout = min(timeout, x_request_timeout)
    return time.monotonic() + timeout


async def client_gone(request: Request) -> None:
    """Return once the client has disconnected. Only awaited after the body is read: from then on the
    server's receive channel has nothing more to say until the connection closes."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


Ready = Annotated[ServiceState, Depends(ready_state)]
State = Annotated[ServiceState, Depends(get_state)]
Deadline = Annotated[float, Depends(request_deadline)]
