"""The one place that maps every error to an HTTP response.

Core modules raise domain errors (``service.core.errors``, the batcher's ``QueueFull`` ...) and never build
HTTP responses; ``install_handlers`` turns each into ``{"error": {"code", "message"}}`` with the right status,
so a client never sees a 500 for bad input and never a stack trace. Under ``/v2`` (the Open Inference
Protocol, ``service.oip``) the body is the protocol's ``{"error": "<message>"}`` and a 422 is its 400: the
same errors, said the way KServe and Triton clients read them.
"""

import logging
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.api.responses import JSONResponse
from service.core.batching import Abandoned, BatchFailed, BatcherStopped, DeadlineExceeded, QueueFull
from service.core.errors import (InvalidInput, InvalidTensor, MalformedBody, ModelNotReady, RequestTooLarge,
                                 UnknownModel, UnsupportedMediaType)
from service.core.reloading import (ArtifactNotFound, PathNotAllowed, ReloadDisabled, ReloadIncomplete,
                                    ReloadInProgress)

log = logging.getLogger(__name__)


def error_response(status: int, code: str, message: str, headers: dict = None, error_id: str = None,
                   path: str = "") -> JSONResponse:
    """The error body for a request to ``path``: ours, or under /v2 the Open Inference Protocol's."""
    if is_protocol_path(path):
        return JSONResponse({"error": message}, status_code=400 if status == 422 else status, headers=headers)
    body = {"code": code, "message": message}
    if error_id:
        body["error_id"] = error_id
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def is_protocol_path(path: str) -> bool:
    return path == "/v2" or path.startswith("/v2/")


_STATUS = {UnsupportedMediaType: 415, RequestTooLarge: 413, MalformedBody: 400, InvalidTensor: 400,
           ReloadDisabled: 403, PathNotAllowed: 403, ArtifactNotFound: 404}


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(InvalidInput)
    async def _invalid(request: Request, exc: InvalidInput) -> JSONResponse:
        return error_response(_STATUS.get(type(exc), 422), exc.code, str(exc), path=request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        where = ".".join(str(p) for p in errors[0].get("loc", ())) if errors else ""
        message = f"{where}: {errors[0].get('msg')}" if errors else "invalid request"
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more)"
        return error_response(422, "validation_error", message, path=request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and str(exc.detail).startswith("Too many"):  # starlette's multipart part limits
            return error_response(413, "too_large", str(exc.detail), path=request.url.path)
        codes = {404: "not_found", 405: "method_not_allowed", 400: "bad_request"}
        return error_response(exc.status_code, codes.get(exc.status_code, "http_error"), str(exc.detail),
                              headers=getattr(exc, "headers", None), path=request.url.path)

    @app.exception_handler(QueueFull)
    async def _queue_full(request: Request, exc: QueueFull) -> JSONResponse:
        return error_response(503, "queue_full", str(exc), headers={"Retry-After": str(exc.retry_after)},
                              path=request.url.path)

    @app.exception_handler(DeadlineExceeded)
    async def _deadline(request: Request, exc: DeadlineExceeded) -> JSONResponse:
        # 504, not 503: the request's own time ran out. No Retry-After: the same request, sent again with the
        # same deadline, would most likely expire again (overload, which a retry can outwait, is 503).
        return error_response(504, "deadline_exceeded", str(exc), path=request.url.path)

    @app.exception_handler(Abandoned)
    async def _abandoned(request: Request, exc: Abandoned) -> JSONResponse:
        # Nobody reads this; 499 (nginx's "client closed request") keeps it apart in the metrics.
        return error_response(499, "client_closed_request", str(exc), path=request.url.path)

    @app.exception_handler(UnknownModel)
    async def _unknown_model(request: Request, exc: UnknownModel) -> JSONResponse:
        return error_response(404, "model_not_found", str(exc), path=request.url.path)

    @app.exception_handler(ModelNotReady)
    async def _not_ready(request: Request, exc: ModelNotReady) -> JSONResponse:
        return error_response(503, "not_ready", str(exc) or "the model is not ready", headers={"Retry-After": "1"},
                              path=request.url.path)

    @app.exception_handler(BatcherStopped)
    async def _stopped(request: Request, exc: BatcherStopped) -> JSONResponse:
        return error_response(503, "shutting_down", str(exc), headers={"Retry-After": "1"}, path=request.url.path)

    @app.exception_handler(ReloadInProgress)
    async def _reload_in_progress(request: Request, exc: ReloadInProgress) -> JSONResponse:
        return error_response(409, "reload_in_progress", str(exc), path=request.url.path)

    @app.exception_handler(ReloadIncomplete)
    async def _reload_incomplete(request: Request, exc: ReloadIncomplete) -> JSONResponse:
        return error_response(503, "reload_incomplete", str(exc), headers={"Retry-After": "5"}, path=request.url.path)

    @app.exception_handler(BatchFailed)
    async def _batch_failed(request: Request, exc: BatchFailed) -> JSONResponse:
        return error_response(500, "model_error", str(exc), error_id=exc.error_id, path=request.url.path)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        error_id = uuid.uuid4().hex[:12]
        log.error("unhandled error on %s %s error_id=%s", request.method, request.url.path, error_id, exc_info=exc)
        return error_response(500, "internal_error", f"internal error (error id {error_id})", error_id=error_id,
                              path=request.url.path)
