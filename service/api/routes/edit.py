"""/directions, /edit, /directions/compute: attribute edits along latent directions (service.core.editing)."""

from typing import Annotated, List, Optional

import numpy as np
from fastapi import APIRouter, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from service.api.deps import CALL_HEADERS, Model, State, client_gone
from service.api.inputs import IMAGE_BODY, decode_base64, latents, media_type, read_image_groups, read_images, read_json
from service.api.responses import NPY, JSONResponse, wants_npy
from service.api.routes.inference import ERRORS
from service.api.routing import ModelRoute
from service.api.schemas import STRENGTHS, ComputedDirectionOut, DirectionsOut, EditIn, EditOut, ExamplesIn
from service.core import codecs, editing
from service.core.errors import InvalidInput, ModelNotReady

router = APIRouter(tags=["editing"], responses=ERRORS)
models = APIRouter(tags=["editing"], responses=ERRORS, route_class=ModelRoute)  # the routes that run the model

EDIT_BODY = {"requestBody": {"required": True, "content": {
    **IMAGE_BODY["requestBody"]["content"], "application/json": {"schema": EditIn.model_json_schema()}}}}
EXAMPLES_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["positive", "negative"], "properties": {
        side: {"type": "array", "items": {"type": "string", "format": "binary"}, "minItems": 1,
               "description": f"Image files {what} the attribute."}
        for side, what in (("positive", "with"), ("negative", "without"))}}},
    "application/json": {"schema": ExamplesIn.model_json_schema()}}}}


@router.get("/directions", response_model=DirectionsOut, responses={503: {}})
async def list_directions(
    state: State,
    vectors: Annotated[bool, Query(description="Also return each direction's vector.")] = False,
) -> JSONResponse:
    """The artifact's latent directions: name, kind, description, counts, norm, held-out AUROC."""
    if state.model is None:
        raise ModelNotReady("no model loaded")
    return JSONResponse(editing.listing(state.model.runtime.metadata.directions, vectors))


@models.post("/edit", response_model=EditOut, openapi_extra=EDIT_BODY | CALL_HEADERS,
             responses={200: {"content": {NPY: {"schema": {"type": "string", "format": "binary"}}}}})
async def edit(
    request: Request, call: Model,
    direction: Annotated[Optional[str], Query(description="For image bodies other than JSON: a stored "
                                                          "direction's name (GET /directions).")] = None,
    strength: Annotated[Optional[List[float]], Query(description="For image bodies other than JSON: repeat for "
                                                                 "each strength (default -2, -1, 0, 1, 2).")] = None,
) -> Response:
    """Images (their posterior means) or latents, moved along a direction and decoded at each strength:
    z' = mu + strength * vector (npy: float32 pixel means (N, S, C, H, W))."""
    model = call.model
    info, section, max_rows = model.info, model.runtime.metadata.directions, call.settings.max_rows
    if media_type(request) == "application/json":
        if direction is not None or strength is not None:
            raise InvalidInput("with a JSON body, give direction and strengths in the body, not the query")
        body = await read_json(request, EditIn)
        if (body.images is None) == (body.z is None):
            raise InvalidInput("give exactly one of images (base64) or z (latent vectors)")
        steps = editing.strengths(body.strengths, STRENGTHS)
        v = editing.vector(section, body.direction, body.vector, info.latent_dim)
        editing.check_rows(len(body.images or body.z), len(steps), max_rows)
        if body.z is not None:
            mu = latents(body.z, info.latent_dim, max_rows)
        else:
            images = await decode_base64(body.images, model.image_spec, max_rows, call.settings.max_request_pixels)
            mu = (await call.submit("encode", images, abandoned=client_gone(request)))["mu"]
    else:
        steps = editing.strengths(strength, STRENGTHS)
        v = editing.vector(section, direction, None, info.latent_dim)
        images = await read_images(request, model.image_spec, call.settings)
        editing.check_rows(len(images), len(steps), max_rows)
        mu = (await call.submit("encode", images, abandoned=client_gone(request)))["mu"]
    z = editing.edited(mu, v, steps)  # (N, S, D)
    n, s, d = z.shape
    out = await call.submit("decode", z.reshape(n * s, d), abandoned=client_gone(request))
    pixels = out["pixels"].reshape(n, s, *out["pixels"].shape[1:])  # (N * S, C, H, W) -> (N, S, C, H, W)
    if wants_npy(request):
        return Response(await run_in_threadpool(codecs.encode_npy, pixels), media_type=NPY)
    return JSONResponse(await run_in_threadpool(editing.edit_body, steps, z, pixels))


@models.post("/directions/compute", response_model=ComputedDirectionOut, openapi_extra=EXAMPLES_BODY | CALL_HEADERS)
async def compute_direction(request: Request, call: Model) -> JSONResponse:
    """Example images with and without an attribute -> its direction (mean mu of positives minus negatives),
    with a held-out AUROC. Stateless: send the vector to /edit."""
    groups = await read_image_groups(request, call.model.image_spec, ExamplesIn, ("positive", "negative"),
                                     call.settings)
    images = np.concatenate([groups["positive"], groups["negative"]])
    mu = (await call.submit("encode", images, abandoned=client_gone(request)))["mu"]
    n_pos = len(groups["positive"])
    return JSONResponse(await run_in_threadpool(editing.computed, mu[:n_pos], mu[n_pos:]))
