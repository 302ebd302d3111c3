"""The Open Inference Protocol v2 (KServe v2 / Triton HTTP): health, metadata and inference of the models
``encoder``, ``decoder`` and ``scorer`` (service.oip.models) on the same batcher, limits, deadlines,
metrics and API key as the rest of the service. Errors are the protocol's ``{"error": "<message>"}``."""

import importlib.metadata
from typing import Annotated, Mapping

from fastapi import APIRouter, Path, Request, Response
from starlette.concurrency import run_in_threadpool

from service.api.deps import CALL_HEADERS, Model, State, client_gone
from service.api.inputs import INLINE_BYTES
from service.api.responses import JSONResponse
from service.api.routing import ModelRoute, ProbeRoute, RoleRoute
from service.core.errors import ModelNotReady
from service.oip import models as protocol
from service.oip.wire import (
    BINARY, HEADER_LENGTH, InferenceRequestIn, InferenceResponseOut, LiveOut, ModelMetadataOut, ModelReadyOut,
    ProtocolError, ReadyOut, ServerMetadataOut, encode_response,
)

ERRORS = {code: {"model": ProtocolError} for code in (400, 401, 404, 413, 415, 500, 503, 504)}
EXTENSIONS = ["binary_tensor_data"]


def _inlined(schema: dict) -> dict:
    """A pydantic schema with its ``$defs`` written in place: the document has no components for them."""
    defs = schema.pop("$defs", {})

    def resolve(node):
        if isinstance(node, dict):
            if "$ref" in node:
                return resolve(defs[node["$ref"].split("/")[-1]])
            return {key: resolve(value) for key, value in node.items()}
        return [resolve(value) for value in node] if isinstance(node, list) else node

    return resolve(schema)


INFER_BODY = {
    "requestBody": {"required": True, "content": {
        "application/json": {"schema": _inlined(InferenceRequestIn.model_json_schema())},
        BINARY: {"schema": {"type": "string", "format": "binary",
                            "description": "The JSON request, then the inputs' raw bytes (binary tensor data "
                                           "extension); Inference-Header-Content-Length is the JSON's length."}},
    }},
    "parameters": [*CALL_HEADERS["parameters"], {
        "name": HEADER_LENGTH, "in": "header", "required": False, "schema": {"type": "integer", "minimum": 0},
        "description": "Bytes of JSON at the start of the body; raw tensor bytes follow it."}],
}
INFER_OUT = {200: {"content": {BINARY: {"schema": {"type": "string", "format": "binary"}}}}}
# The document names the models and the version this server has (a generated request reaches a real model);
# the routes still answer any other name or version with the protocol's 404.
ModelName = Annotated[str, Path(description="encoder, decoder or scorer; any other name: 404.",
                                json_schema_extra={"enum": list(protocol.MODEL_NAMES)})]
ModelVersion = Annotated[str, Path(description="Each model has one version, 1; any other: 404.",
                                   json_schema_extra={"enum": [protocol.VERSION]})]



class _Named:
    """A route under /v2/models/{name}: labelled by the model's name when it is one of ours (bounded: a client's
    arbitrary names and versions never become label values), its version left out."""

    def label(self, params: Mapping[str, str]) -> str:
        name = params.get("name")
        return self.path_format.replace("/versions/{version}", "").replace(
            "{name}", name if name in protocol.MODEL_NAMES else "{name}")


class NamedRoute(_Named, RoleRoute):
    pass


class NamedModelRoute(_Named, ModelRoute):
    pass


_ROUTERS = dict(prefix="/v2", tags=["open inference protocol"], responses=ERRORS)
server = APIRouter(**_ROUTERS)
probes = APIRouter(**_ROUTERS, route_class=ProbeRoute)
models = APIRouter(**_ROUTERS, route_class=NamedRoute)  # metadata and readiness of each model
inference = APIRouter(**_ROUTERS, route_class=NamedModelRoute)


@server.get("", response_model=ServerMetadataOut)
async def server_metadata() -> JSONResponse:
    """Server metadata: name, version and extensions (binary_tensor_data)."""
    return JSONResponse({"name": "vae-service", "version": _version(), "extensions": EXTENSIONS})


@probes.get("/health/live", response_model=LiveOut, responses={503: {"model": LiveOut}})
async def live(state: State) -> JSONResponse:
    """200 while the process serves HTTP; 503 if the model can never become ready (as /livez)."""
    return JSONResponse({"live": not state.failed}, status_code=503 if state.failed else 200)


@probes.get("/health/ready", response_model=ReadyOut, responses={503: {"model": ReadyOut}})
async def ready(state: State) -> JSONResponse:
    """200 once every model is warm (in every server process); 503 before that and while draining (as /readyz)."""
    return _ready({"ready": state.server_ready})


@models.get("/models/{name}", response_model=ModelMetadataOut)
async def model_metadata(state: State, name: ModelName) -> JSONResponse:
    """A model's platform, versions, inputs and outputs (datatypes; shapes, -1 for any size)."""
    if state.model is None:
        raise ModelNotReady("no model loaded yet")
    return JSONResponse(protocol.model(state.model.info, name).metadata())


@models.get("/models/{name}/versions/{version}", response_model=ModelMetadataOut)
async def model_version_metadata(state: State, name: ModelName, version: ModelVersion) -> JSONResponse:
    """The same, for one version of the model (each has one, "1")."""
    protocol.known(name, version)
    return await model_metadata(state, name)


@models.get("/models/{name}/ready", response_model=ModelReadyOut, responses={503: {"model": ModelReadyOut}})
async def model_ready(state: State, name: ModelName) -> JSONResponse:
    """200 when the model serves, 503 while it warms up or drains, 404 for a model this server does not have."""
    protocol.known(name)
    return _ready({"name": name, "ready": state.server_ready})


@models.get("/models/{name}/versions/{version}/ready", response_model=ModelReadyOut,
            responses={503: {"model": ModelReadyOut}})
async def model_version_ready(state: State, name: ModelName, version: ModelVersion) -> JSONResponse:
    """The same, for one version of the model."""
    protocol.known(name, version)
    return await model_ready(state, name)


@inference.post("/models/{name}/infer", response_model=InferenceResponseOut, responses=INFER_OUT,
             openapi_extra=INFER_BODY)
async def infer(request: Request, call: Model, name: ModelName) -> Response:
    """Inputs -> the requested outputs, as JSON tensors or raw bytes (binary tensor data extension)."""
    model = protocol.model(call.model.info, name)
    body = await request.body()
    small = len(body) <= INLINE_BYTES and "content-encoding" not in request.headers
    args = (call.settings, call.model, model, body, request.headers.get(HEADER_LENGTH),
            request.headers.get("content-encoding"))
    prepared = protocol.prepare(*args) if small else await run_in_threadpool(protocol.prepare, *args)
    deadline = protocol.deadline(call.deadline, prepared.request.parameters)
    arrays, parameters = await model.run(call.state.batcher, call.model, prepared.arrays, prepared.parameters, deadline,
                                         client_gone(request))
    outputs = {output: arrays[output] for output in prepared.outputs}
    # model_version: the artifact that answered (as X-Model-Sha256 and /v1/model say), so a client can tell the
    # answers of two models apart across a reload; the routes' version stays "1".
    args = (name, call.model.info.sha256, prepared.request, outputs, parameters)
    if sum(array.nbytes for array in outputs.values()) <= INLINE_BYTES:
        content, json_length = encode_response(*args)
    else:
        content, json_length = await run_in_threadpool(encode_response, *args)
    if json_length is None:
        return Response(content, media_type="application/json")
    return Response(content, media_type=BINARY, headers={"Inference-Header-Content-Length": str(json_length)})


@inference.post("/models/{name}/versions/{version}/infer", response_model=InferenceResponseOut, responses=INFER_OUT,
             openapi_extra=INFER_BODY)
async def infer_version(request: Request, call: Model, name: ModelName, version: ModelVersion) -> Response:
    """The same, for one version of the model."""
    protocol.known(name, version)
    return await infer(request, call, name)


def _ready(body: dict) -> JSONResponse:
    if body["ready"]:
        return JSONResponse(body)
    return JSONResponse(body, status_code=503, headers={"Retry-After": "1"})


def _version() -> str:
    try:
        return importlib.metadata.version("vae-service")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
