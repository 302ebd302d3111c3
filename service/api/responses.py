"""Responses: the strict JSON response class, and arrays -> the format the client asked for (JSON or npy)."""

from typing import Any, Optional

import numpy as np
import orjson
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from service.core import codecs

NPY = "application/x-npy"


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        # orjson writes non-finite floats as null, so every body is valid JSON for strict parsers.
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


def wants_npy(request: Request) -> bool:
    return NPY in request.headers.get("accept", "")


async def images_response(request: Request, pixels: np.ndarray, z: np.ndarray, seed: Optional[int] = None) -> Response:
    """Pixel means (N, C, H, W) -> base64 PNGs in JSON, or the float32 means themselves as .npy."""
    if wants_npy(request):
        return Response(await run_in_threadpool(codecs.encode_npy, pixels), media_type=NPY)
    images = await run_in_threadpool(lambda: [codecs.encode_png_base64(im) for im in codecs.to_uint8(pixels)])
    return JSONResponse({"images": images, "z": z.tolist(), "seed": seed})
