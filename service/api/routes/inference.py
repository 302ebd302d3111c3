"""/encode, /decode, /sample, /interpolate: the model's latent space over HTTP."""

import secrets
from typing import Annotated, Literal, Optional

import numpy as np
from fastapi import APIRouter, Query, Request, Response

from service.api.deps import CALL_HEADERS, Model, ModelCall, client_gone
from service.api.inputs import IMAGE_BODY, decode_base64, image_body, json_body, latents, read_images, read_json
from service.api.responses import NPY, JSONResponse, images_response, wants_npy
from service.api.routing import ModelRoute
from service.api.schemas import EncodeOut, ErrorResponse, ImagesOut, InterpolateIn, LatentsIn, SampleIn
from service.core import codecs, latent
from service.core.errors import InvalidInput, RequestTooLarge

ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 413, 415, 422, 500, 503, 504)}
IMAGES_OUT = {200: {"content": {NPY: {"schema": {"type": "string", "format": "binary"}}}}}

router = APIRouter(tags=["inference"], responses=ERRORS, route_class=ModelRoute)


@router.post("/encode", response_model=EncodeOut, openapi_extra=IMAGE_BODY | CALL_HEADERS,
             responses={200: {"content": {NPY: {"schema": {"type": "string", "format": "binary"}}}}})
async def encode(
    request: Request, call: Model,
    sample: Annotated[bool, Query(description="Also return z = mu + sigma * eps drawn with `seed`.")] = False,
    seed: Annotated[Optional[int], Query(ge=0, le=2**63 - 1)] = None,
) -> Response:
    """Images -> posterior mean and log-variance per image (npy: (N, 2, D) stacked mu, logvar)."""
    images = await read_images(request, call.model.image_spec, call.settings)
    out = await call.submit("encode", images, abandoned=client_gone(request))
    if wants_npy(request):
        return Response(codecs.encode_npy(np.stack([out["mu"], out["logvar"]], axis=1)), media_type=NPY)
    body = {"mu": out["mu"].tolist(), "logvar": out["logvar"].tolist(), "z": None, "seed": None}
    if sample:
        seed = secrets.randbits(63) if seed is None else seed
        body.update(z=latent.posterior_sample(out["mu"], out["logvar"], seed).tolist(), seed=seed)
    return JSONResponse(body)


@router.post("/decode", response_model=ImagesOut, responses=IMAGES_OUT, openapi_extra=json_body(LatentsIn) | CALL_HEADERS)
async def decode(request: Request, call: Model) -> Response:
    """Latent vectors -> images (base64 PNG in JSON, or float32 pixel means as npy)."""
    body = await read_json(request, LatentsIn)
    z = latents(body.z, call.model.info.latent_dim, call.settings.max_rows)
    out = await call.submit("decode", z, abandoned=client_gone(request))
    return await images_response(request, out["pixels"], z)


@router.post("/sample", response_model=ImagesOut, responses=IMAGES_OUT, openapi_extra=json_body(SampleIn) | CALL_HEADERS)
async def sample(request: Request, call: Model) -> Response:
    """Draw n images from the prior; the same seed gives the same z and the same bytes."""
    body = await read_json(request, SampleIn)
    if body.n > call.settings.max_n:
        raise RequestTooLarge(f"n={body.n} is over the limit of {call.settings.max_n}")
    seed = secrets.randbits(63) if body.seed is None else body.seed
    prior, dim = call.model.runtime.metadata.prior, call.model.info.latent_dim
    if prior.is_standard:
        z = latent.prior_sample(body.n, dim, seed, body.temperature)
    else:  # a mixture: noise and components from the seed here, z from the artifact's own sampler
        rows = latent.mixture_noise(body.n, dim, prior.components, seed, body.temperature)
        z = (await call.submit("prior", rows, abandoned=client_gone(request)))["z"]
    out = await call.submit("decode", z, abandoned=client_gone(request))
    return await images_response(request, out["pixels"], z, seed=seed)


@router.post("/interpolate", response_model=ImagesOut, responses=IMAGES_OUT,
             openapi_extra=image_body(InterpolateIn, files=2) | CALL_HEADERS)
async def interpolate(
    request: Request, call: Model,
    steps: Annotated[int, Query(ge=2, description="Frames including both ends.")] = 8,
    method: Annotated[Literal["linear", "slerp"], Query()] = "slerp",
) -> Response:
    """Frames between two images (their posterior means) or two latents; the ends decode mu_a and mu_b."""
    if steps > call.settings.max_steps:
        raise RequestTooLarge(f"steps={steps} is over the limit of {call.settings.max_steps}")
    ends = await _end_latents(request, call)
    path = latent.interpolate(ends[0], ends[1], steps, method)
    # Never a non-finite frame to the model or into the JSON (orjson would write null): schemas.END_MAX keeps
    # latent ends far enough inside float32, but the posterior means of image ends are not bounded by it.
    if not np.isfinite(path).all():
        raise InvalidInput("the path between these ends leaves the float32 range")
    out = await call.submit("decode", path, abandoned=client_gone(request))
    return await images_response(request, out["pixels"], path)


async def _end_latents(request: Request, call: ModelCall) -> np.ndarray:
    dim = call.model.info.latent_dim
    if request.headers.get("content-type", "").startswith("application/json"):
        body = await read_json(request, InterpolateIn)
        if (body.z is None) == (body.images is None):
            raise InvalidInput("give exactly one of z (two latents) or images (two base64 images)")
        if body.z is not None:
            return latents(body.z, dim, 2)
        images = await decode_base64(body.images, call.model.image_spec, 2, call.settings.max_request_pixels)
    else:
        images = await read_images(request, call.model.image_spec, call.settings, max_rows=2)
    if len(images) != 2:
        raise InvalidInput(f"interpolation needs exactly two images, got {len(images)}")
    return (await call.submit("encode", images, abandoned=client_gone(request)))["mu"]
