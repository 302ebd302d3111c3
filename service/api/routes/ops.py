"""Health, readiness, metrics, model metadata and reload. All but the reload are cheap and never queued. The
probes need no API key; the rest need it when the server has one (/metrics not with VAE_METRICS_PUBLIC), see
ApiKeyRequired."""

from fastapi import APIRouter, Request, Response

from service.api import reload as reloading
from service.api.deps import State
from service.api.inputs import json_body, read_json
from service.api.responses import JSONResponse
from service.api.routing import ProbeRoute
from service.api.schemas import ErrorResponse, ModelOut, ReloadIn, ReloadOut, Status
from service.core.metrics import CONTENT_TYPE

router = APIRouter(tags=["ops"])
probes = APIRouter(tags=["ops"], route_class=ProbeRoute)
KEYED = {401: {"model": ErrorResponse, "description": "Missing or wrong X-API-Key (when the server has a key)."}}


@probes.get("/livez", response_model=Status, responses={503: {"model": Status}})
async def livez(state: State) -> JSONResponse:
    """200 while the process serves HTTP; 503 if the model can never become ready (restart it)."""
    if state.failed:
        return JSONResponse({"status": state.failed}, status_code=503)
    return JSONResponse({"status": "alive"})


@probes.get("/readyz", response_model=Status, responses={503: {"model": Status}})
async def readyz(state: State) -> JSONResponse:
    """200 once the model is loaded and every shape bucket is warm; 503 before that and while draining."""
    if state.server_ready:  # with several processes: every one of them
        return JSONResponse({"status": "ready"})
    status = "draining" if state.draining else "warming_up"
    return JSONResponse({"status": status}, status_code=503, headers={"Retry-After": "1"})


@router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE: {}}}, **KEYED})
async def metrics(state: State) -> Response:
    """Prometheus text exposition."""
    if state.model is not None:
        runtime = state.model.runtime
        device = str(runtime.device)
        for kind, value in runtime.gpu_memory().items():
            state.metrics.gpu_memory.labels(device, kind).set(value)
    return Response(state.metrics.render(), media_type=CONTENT_TYPE)


@router.get("/v1/model", response_model=ModelOut, responses={503: {}, **KEYED})
async def model(state: State) -> JSONResponse:
    """The served artifact: device, sha256, shapes and its metadata.json (calibration scores left out)."""
    if state.model is None:
        return JSONResponse({"error": {"code": "not_ready", "message": "no model loaded"}}, status_code=503)
    runtime = state.model.runtime
    info = runtime.info
    meta = runtime.metadata.to_dict()
    if isinstance(meta.get("calibration"), dict):
        meta["calibration"] = {k: v for k, v in meta["calibration"].items() if k != "scores"}
    return JSONResponse({
        "device": str(runtime.device), "sha256": info.sha256,
        "image": {"channels": info.channels, "height": info.height, "width": info.width},
        "latent_dim": info.latent_dim, "score_k": info.score_k, "metadata": meta,
    })


RELOAD_ERRORS = {code: {"model": ErrorResponse} for code in (403, 404, 409, 422, 503)}


@router.post("/v1/model/reload", response_model=ReloadOut, responses={**RELOAD_ERRORS, **KEYED},
             openapi_extra={"requestBody": {**json_body(ReloadIn)["requestBody"], "required": False}})
async def reload(request: Request, state: State) -> JSONResponse:
    """Serve another artifact (or the configured file again) in every server process, without a restart: the
    new one is checked and warmed beside the old, which serves until the switch; a refused file changes
    nothing. Off unless VAE_ALLOW_RELOAD; 409 while another reload runs."""
    body = ReloadIn() if not (await request.body()).strip() else await read_json(request, ReloadIn)
    return JSONResponse((await reloading.reload(state, body.path)).to_dict())
