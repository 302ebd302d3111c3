"""What routes receive: the service state and, for model endpoints, the checked call (readiness, deadline).
The API key is checked before any route, for every path (service.api.middleware.ApiKeyRequired)."""

import asyncio
import math
import re
import time
from dataclasses import dataclass, field
from typing import Annotated, Awaitable, Callable, Hashable, Optional

import numpy as np

from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError

from service.config import Settings
from service.core.batching import Batcher, Outputs
from service.core.errors import ModelNotReady
from service.core.metrics import Metrics, processes_ready
from service.core.served import ServedModel


@dataclass
class ServiceState:
    settings: Settings
    metrics: Metrics
    model: Optional[ServedModel] = None  # set once loaded; a request reads it once (ModelCall) and keeps it
    batcher: Optional[Batcher] = None
    warm: bool = False
    failed: Optional[str] = None  # why the model can never become ready (e.g. warm-up crashed)
    draining: bool = False
    started: float = field(default_factory=time.monotonic)
    reload_lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one reload at a time (service.api.reload)
    retired: Optional[Callable[[], object]] = None  # a weak reference to the model the last reload replaced

    @property
    def ready(self) -> bool:
        """This process serves model requests."""
        return self.warm and not self.draining and self.batcher is not None

    @property
    def server_ready(self) -> bool:
        """The whole server serves: this process and, with several processes, every one of them."""
        if not self.ready:
            return False
        metrics_dir, processes = self.settings.metrics_dir, self.settings.processes or 1
        return metrics_dir is None or processes == 1 or processes_ready(processes, metrics_dir)


async def get_state(request: Request) -> ServiceState:
    return request.app.state.service


@dataclass(frozen=True)
class ModelCall:
    """What a model endpoint gets once its request may go on: the state, the model that answers it (read once,
    so one model answers the whole request), and the monotonic time after which the request's rows are dropped
    instead of computed."""

    state: ServiceState
    model: ServedModel
    deadline: float

    @property
    def settings(self) -> Settings:
        return self.state.settings

    def submit(self, kernel: str, rows: np.ndarray, params: Hashable = None, *,
               abandoned: Optional[Awaitable] = None) -> Awaitable[Outputs]:
        """This request's rows to the batcher: computed by the request's model, before its deadline."""
        return self.state.batcher.submit(kernel, rows, params, deadline=self.deadline, abandoned=abandoned,
                                         runner=self.model.runtime)


# X-Request-Timeout's range. Below a millisecond a deadline has passed before the body is read: the request
# could only ever fail, so it is refused as invalid rather than accepted and expired.
MIN_TIMEOUT_S, MAX_TIMEOUT_S = 0.001, 3600.0
_NUMBER = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")

# Documented here because they are read outside FastAPI's parameters: the key by ApiKeyRequired, the timeout by
# model_call (below).
CALL_HEADERS = {"parameters": [
    {"name": "x-api-key", "in": "header", "required": False, "schema": {"type": "string"},
     "description": "Required when the server has an API key."},
    {"name": "x-request-timeout", "in": "header", "required": False,
     "schema": {"type": "number", "minimum": MIN_TIMEOUT_S, "maximum": MAX_TIMEOUT_S},
     "description": f"Seconds this request may take, from {MIN_TIMEOUT_S:g} to {MAX_TIMEOUT_S:g}; the server's "
                    "VAE_REQUEST_TIMEOUT_S caps it. Rows still queued when it passes are dropped: 504 "
                    "deadline_exceeded, without Retry-After (the same request would expire again)."},
]}


async def model_call(request: Request) -> ModelCall:
    """Every check a model endpoint makes before it reads the body (the API key passed already), in order:
    readiness (503) and the X-Request-Timeout header (422). One dependency that reads its header itself:
    FastAPI resolves every dependency and header parameter anew on each request, and the ones this replaces
    cost about 60 us per request, as much as parsing and decoding a small PNG."""
    state: ServiceState = request.app.state.service
    if not state.ready:
        raise ModelNotReady("the service is draining" if state.draining else "the model is still warming up")
    timeout = state.settings.request_timeout_s
    header = request.headers.get("x-request-timeout")
    if header is not None:
        timeout = min(timeout, _request_timeout(header))
    model = state.model  # read once: this request is answered by this model, whatever reloads meanwhile
    request.state.model_sha256 = model.info.sha256  # for X-Model-Sha256 (service.api.middleware.ModelHeader)
    return ModelCall(state, model, time.monotonic() + timeout)


def _request_timeout(value: str) -> float:
    # A number as JSON writes it, as the document says: float() alone would also take "1_0", " 5" or "infinity".
    seconds = float(value) if _NUMBER.fullmatch(value) else math.nan
    if not MIN_TIMEOUT_S <= seconds <= MAX_TIMEOUT_S:  # also refuses nan
        raise RequestValidationError([{
            "type": "value_error", "loc": ("header", "x-request-timeout"),
            "msg": f"must be a number of seconds in [{MIN_TIMEOUT_S:g}, {MAX_TIMEOUT_S:g}], got {value!r}",
            "input": value,
        }])
    return seconds


async def client_gone(request: Request) -> None:
    """Return once the client has disconnected. Only awaited after the body is read: from then on the
    server's receive channel has nothing more to say until the connection closes."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


State = Annotated[ServiceState, Depends(get_state)]
Model = Annotated[ModelCall, Depends(model_call)]
