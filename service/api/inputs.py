"""Request bodies -> arrays: images, latents and JSON bodies, checked against the model and the limits.

Image bodies come in three forms, chosen by Content-Type: ``multipart/form-data`` (one or more file parts),
``application/json`` (``{"images": [base64, ...]}``) or ``application/x-npy`` (one uint8/float batch).
Every image body goes through the same three steps, each refusing before the next costs anything:

1. split the body into image files (for npy: read its header), and count them against ``max_rows``;
2. read every file's header: its size in pixels (and ``max_pixels`` per image), summed over the request and
   checked against the server's ``max_request_pixels`` (413): decoding cost follows pixels, not bytes (a
   15 KB PNG can hold 4000x4000 pixels, 40 ms of decoding), so a request is refused before any decoding;
3. decode.

Steps 1-2 run on the event loop for a small body (up to ``INLINE_BYTES``), step 3 only when the body is small
AND holds few pixels (up to ``INLINE_PIXELS``): there, a 28x28 PNG takes about 25 us, less than a hop to the
thread pool and back (~100 us). Anything larger runs in the thread pool, so no upload stalls other requests.

Multipart bodies are split with python-multipart's parser directly: the whole body is in memory already
(``BodyLimit`` bounds it), and Starlette's form machinery (a spooled temporary file per part) costs about
three times as much per small image.
"""

from typing import Callable, Dict, List, Optional, Sequence, Tuple, Type, TypeVar

import numpy as np
import orjson
from fastapi import Request
from pydantic import BaseModel, ValidationError
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool

from service.api.responses import NPY
from service.api.schemas import ImagesIn
from service.config import Settings
from service.core import codecs
from service.core.errors import InvalidInput, MalformedBody, RequestTooLarge, UnsupportedMediaType

NPY_TYPES = (NPY, "application/octet-stream")
INLINE_BYTES = 16 * 1024
INLINE_PIXELS = 16 * 1024  # e.g. one 128x128 image or twenty 28x28 digits: ~0.1 ms of decoding
M = TypeVar("M", bound=BaseModel)

def image_body(json_model: Type[BaseModel] = ImagesIn, files: Optional[int] = None) -> dict:
    """OpenAPI for an image body in any of its three forms: multipart with ``files`` file parts (default: one or
    more; service.api.openapi adds the server's row limit), ``json_model`` as JSON, or an npy batch."""
    count = {"minItems": 1} if files is None else {"minItems": files, "maxItems": files}
    file_parts = {"type": "array", "items": {"type": "string", "format": "binary"}, **count, "description": (
        "Image files: every part with a filename is one, whatever its name. Other form fields are ignored, but "
        "all parts count toward a limit of one more than the files allowed.")}
    return {"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": {"type": "object", "properties": {"file": file_parts}, "required": ["file"]}},
        "application/json": {"schema": json_model.model_json_schema()},
        NPY: {"schema": {"type": "string", "format": "binary"}},
    }}}


IMAGE_BODY = image_body()  # shared by the endpoints that take any number of images


def json_body(model: Type[BaseModel]) -> dict:
    """OpenAPI for an endpoint that reads its JSON body itself (so FastAPI does not parse it twice)."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def read_json(request: Request, model: Type[M]) -> M:
    if media_type(request) != "application/json":
        raise UnsupportedMediaType(f"expected application/json, got {media_type(request) or 'no Content-Type'}")
    return validated(model, await request.body())


def validated(model: Type[M], raw, error: Type[InvalidInput] = InvalidInput, what: str = "body") -> M:
    """``raw`` JSON bytes as ``model``; ``error`` (a 4xx) naming the first field that does not fit."""
    try:
        return model.model_validate(orjson.loads(raw))
    except orjson.JSONDecodeError as exc:
        raise error(f"{what} is not valid JSON: {exc}") from exc
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise error(f"{where}: {first['msg']}") from exc


async def read_images(request: Request, spec: codecs.ImageSpec, limits: Settings,
                      max_rows: Optional[int] = None) -> np.ndarray:
    """Any accepted image body -> uint8 (N, C, H, W) in the model's mode and size, within ``max_rows`` (default:
    the server's) and the server's ``max_request_pixels`` (the module docstring's three steps)."""
    max_rows, max_pixels = max_rows or limits.max_rows, limits.max_request_pixels
    kind = media_type(request)
    if kind == "multipart/form-data":
        body = await request.body()
        content_type = request.headers["content-type"]
        files, pixels = await _inline_if(len(body) <= INLINE_BYTES, _multipart_images, body, content_type, spec,
                                         max_rows)
        return await _decode(files, pixels, len(body), spec, max_pixels)
    if kind == "application/json":
        payload = await read_json(request, ImagesIn)
        return await decode_base64(payload.images, spec, max_rows, max_pixels)
    if kind in NPY_TYPES:
        body = await request.body()
        batch = codecs.npy_batch(body, spec)  # a view: the header read, no pixel touched
        _check_rows(len(batch), max_rows)
        _check_pixels(batch.size // spec.channels, max_pixels)
        # No compression in npy: its bytes are its pixels, and the byte count alone says what copying costs.
        return await _inline_if(len(body) <= INLINE_BYTES, codecs.npy_pixels, batch)
    raise UnsupportedMediaType(
        f"send images as multipart/form-data, application/json or {NPY}, not {kind or 'no Content-Type'}"
    )


async def decode_base64(items: Sequence[str], spec: codecs.ImageSpec, max_rows: int, max_pixels: int) -> np.ndarray:
    """Base64 images or data URLs (a JSON body's) -> uint8 (N, C, H, W), with ``read_images``' steps and limits."""
    _check_rows(len(items), max_rows)
    size = sum(len(item) for item in items)
    files, pixels = await _inline_if(size <= INLINE_BYTES, _base64_images, items, spec)
    return await _decode(files, pixels, size, spec, max_pixels)


async def _decode(files: List[bytes], pixels: int, size: int, spec: codecs.ImageSpec, max_pixels: int) -> np.ndarray:
    _check_pixels(pixels, max_pixels)
    return await _inline_if(size <= INLINE_BYTES and pixels <= INLINE_PIXELS, codecs.decode_images, files, spec)


async def _inline_if(inline: bool, fn: Callable, *args):
    """``fn(*args)`` right here on the event loop when it is cheap, else in the thread pool."""
    if inline:
        return fn(*args)
    return await run_in_threadpool(fn, *args)


def _multipart_images(body: bytes, content_type: str, spec: codecs.ImageSpec,
                      max_rows: int) -> Tuple[List[bytes], int]:
    """Steps 1-2 for multipart: the file parts, and their source pixels in all."""
    files = multipart_files(body, content_type, max_parts=max_rows + 1)
    _check_rows(len(files), max_rows)
    if not files:
        raise codecs.InvalidImage("multipart body has no file part")
    return files, codecs.sources_pixels(files, spec)


def _base64_images(items: Sequence[str], spec: codecs.ImageSpec) -> Tuple[List[bytes], int]:
    """Steps 1-2 for base64 items: the image files, and their source pixels in all."""
    files = codecs.base64_files(items)
    return files, codecs.sources_pixels(files, spec)


def multipart_files(body: bytes, content_type: str, max_parts: int) -> List[bytes]:
    """The file parts (those whose Content-Disposition names a filename) of a multipart/form-data body, in
    order. More than ``max_parts`` parts of any kind: ``RequestTooLarge``, raised as soon as one too many
    begins. Framing errors (no boundary, a broken part header): ``MalformedBody``."""
    return [data for _, data in multipart_named_files(body, content_type, max_parts)]


def multipart_named_files(body: bytes, content_type: str, max_parts: int) -> List[Tuple[str, bytes]]:
    """``multipart_files`` with each file part's form field name ("" when it has none)."""
    boundary = parse_options_header(content_type)[1].get(b"boundary")
    if not boundary:
        raise MalformedBody("multipart/form-data without a boundary in its Content-Type")
    files: List[Tuple[str, bytes]] = []
    parts = 0
    headers: Dict[bytes, bytes] = {}
    name = value = b""
    chunks: List[bytes] = []

    def on_part_begin() -> None:
        nonlocal parts, name, value
        parts += 1
        if parts > max_parts:
            raise RequestTooLarge(f"more than {max_parts} parts in one multipart body")
        headers.clear()
        chunks.clear()
        name = value = b""

    def on_header_field(data: bytes, start: int, end: int) -> None:
        nonlocal name
        name += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        nonlocal value
        value += data[start:end]

    def on_header_end() -> None:
        nonlocal name, value
        headers[name.lower()] = value
        name = value = b""

    def on_part_data(data: bytes, start: int, end: int) -> None:
        chunks.append(data[start:end])

    def on_part_end() -> None:
        options = parse_options_header(headers.get(b"content-disposition", b""))[1]
        if b"filename" in options:
            files.append((options.get(b"name", b"").decode("latin-1"), b"".join(chunks)))

    parser = MultipartParser(boundary, {
        "on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_header_end": on_header_end, "on_part_data": on_part_data, "on_part_end": on_part_end,
    })
    try:
        parser.write(body)
        parser.finalize()
    except MultipartParseError as exc:
        raise MalformedBody(f"malformed multipart body: {exc}") from exc
    return files


async def read_image_groups(request: Request, spec: codecs.ImageSpec, model: Type[BaseModel], groups: Sequence[str],
                            limits: Settings) -> Dict[str, np.ndarray]:
    """Images in named groups (e.g. positive and negative examples) -> uint8 (N, C, H, W) per group: multipart
    file parts whose field name is the group's, or JSON ``model`` with a list of base64 images per group. The
    limits of ``read_images`` apply to all the images together; a group without images is InvalidInput."""
    max_rows = limits.max_rows
    kind = media_type(request)
    if kind == "application/json":
        payload = await read_json(request, model)
        named = [(group, item) for group in groups for item in getattr(payload, group)]
        images = await decode_base64([item for _, item in named], spec, max_rows, limits.max_request_pixels)
    elif kind == "multipart/form-data":
        body = await request.body()
        named = multipart_named_files(body, request.headers["content-type"], max_parts=max_rows + 1)
        named = [(name, data) for name, data in named if name in groups]
        _check_rows(len(named), max_rows)
        if not named:
            raise codecs.InvalidImage(f"multipart body has no file part named {' or '.join(groups)}")
        files = [data for _, data in named]
        pixels = await _inline_if(len(body) <= INLINE_BYTES, codecs.sources_pixels, files, spec)
        images = await _decode(files, pixels, len(body), spec, limits.max_request_pixels)
    else:
        raise UnsupportedMediaType(
            f"send images as multipart/form-data or application/json, not {kind or 'no Content-Type'}")
    names = np.array([name for name, _ in named])
    out = {group: images[names == group] for group in groups}
    empty = [group for group, array in out.items() if len(array) == 0]
    if empty:
        raise InvalidInput(f"no {' and no '.join(empty)} images: every group needs at least one")
    return out


def latents(z: List[List[float]], dim: int, max_rows: int) -> np.ndarray:
    _check_rows(len(z), max_rows)
    bad = [i for i, v in enumerate(z) if len(v) != dim]
    if bad:
        raise InvalidInput(f"z[{bad[0]}] has {len(z[bad[0]])} values; this model's latent size is {dim}")
    with np.errstate(over="ignore"):  # overflow is reported below as a client error
        array = np.asarray(z, dtype=np.float32)
    if not np.isfinite(array).all():  # finite in float64 JSON can still overflow float32
        raise InvalidInput("z has values that are not finite in float32")
    return array


def _check_rows(n: int, max_rows: int) -> None:
    if n > max_rows:
        raise RequestTooLarge(f"{n} rows in one request; the limit is {max_rows}")


def _check_pixels(pixels: int, max_pixels: int) -> None:
    if pixels > max_pixels:
        raise RequestTooLarge(f"the images of this request hold {pixels} pixels in all (from their headers); "
                              f"the limit is {max_pixels} per request")

