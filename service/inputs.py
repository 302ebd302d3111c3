"""Request bodies -> arrays, and arrays -> responses in the format the client asked for.

Image bodies come in three forms, chosen by Content-Type: ``multipart/form-data`` (one or more file parts),
``application/json`` (``{"images": [base64, ...]}``) or ``application/x-npy`` (one uint8/float batch).
Decoding runs in the thread pool, never on the event loop.
"""

from typing import List, Type, TypeVar

import numpy as np
import orjson
from fastapi import Request, Response
from service.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from service import codecs
from service.errors import RequestTooLarge, UnsupportedMediaType
from service.schemas import ImagesIn

NPY = "application/x-npy"
NPY_TYPES = (NPY, "application/octet-stream")
M = TypeVar("M", bound=BaseModel)

# OpenAPI description of an image body, shared by every endpoint that takes images.
IMAGE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"file": {"type": "array", "items": {"type": "string", "format": "binary"}}},
                    "required": ["file"],
                }
            },
            "application/json": {"schema": ImagesIn.model_json_schema()},
            NPY: {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


def json_body(model: Type[BaseModel]) -> dict:
    """OpenAPI for an endpoint that reads its JSON body itself (so FastAPI does not parse it twice)."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def wants_npy(request: Request) -> bool:
    return NPY in request.headers.get("accept", "")


async def read_json(request: Request, model: Type[M]) -> M:
    if media_type(request) != "application/json":
        raise UnsupportedMediaType(f"expected application/json, got {media_type(request) or 'no Content-Type'}")
    body = await request.body()
    try:
        return model.model_validate(orjson.loads(body))
    except orjson.JSONDecodeError as exc:
        raise codecs.InvalidInput(f"body is not valid JSON: {exc}") from exc
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise codecs.InvalidInput(f"{where}: {first['msg']}") from exc


async def read_images(request: Request, spec: codecs.ImageSpec, max_rows: int) -> np.ndarray:
    """Any accepted image body -> uint8 (N, C, H, W) in the model's mode and size."""
    kind = media_type(request)
    if kind == "multipart/form-data":
        async with request.form(max_files=max_rows + 1, max_fields=max_rows + 1) as form:
            files = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
            _check_rows(len(files), max_rows)
            if not files:
                raise codecs.InvalidImage("multipart body has no file part")
            blobs: List[bytes] = [await f.read() for f in files]
        return await run_in_threadpool(codecs.decode_images, blobs, spec)
    if kind == "application/json":
        payload = await read_json(request, ImagesIn)
        _check_rows(len(payload.images), max_rows)
        return await run_in_threadpool(codecs.decode_base64_images, payload.images, spec)
    if kind in NPY_TYPES:
        images = await run_in_threadpool(codecs.decode_npy, await request.body(), spec)
        _check_rows(len(images), max_rows)
        return images
    raise UnsupportedMediaType(
        f"send images as multipart/form-data, application/json or {NPY}, not {kind or 'no Content-Type'}"
    )


def latents(z: List[List[float]], dim: int, max_rows: int) -> np.ndarray:
    _check_rows(len(z), max_rows)
    bad = [i for i, v in enumerate(z) if len(v) != dim]
    if bad:
        raise codecs.InvalidInput(f"z[{bad[0]}] has {len(z[bad[0]])} values; this model's latent size is {dim}")
    with np.errstate(over="ignore"):  # overflow is reported below as a client error
        array = np.asarray(z, dtype=np.float32)
    if not np.isfinite(array).all():  # finite in float64 JSON can still overflow float32
        raise codecs.InvalidInput("z has values that are not finite in float32")
    return array


async def images_response(request: Request, pixels: np.ndarray, z: np.ndarray, seed=None) -> Response:
    """Pixel means (N, C, H, W) -> base64 PNGs in JSON, or the float32 means themselves as .npy."""
    if wants_npy(request):
        return Response(await run_in_threadpool(codecs.encode_npy, pixels), media_type=NPY)
    images = await run_in_threadpool(lambda: [codecs.encode_png_base64(im) for im in codecs.to_uint8(pixels)])
    return JSONResponse({"images": images, "z": z.tolist(), "seed": seed})


def _check_rows(n: int, max_rows: int) -> None:
    if n > max_rows:
        raise RequestTooLarge(f"{n} rows in one request; the limit is {max_rows}")

