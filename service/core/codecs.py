"""Bytes <-> uint8 pixel arrays: image files, base64 / data URLs and ``.npy`` batches.

Pure numpy + Pillow (no torch), so routes can run it in a thread pool off the event loop. Decoders return
C-contiguous, writeable uint8 arrays, (C, H, W) for one image or (N, C, H, W) for a batch, in the model's mode
and size. Bad client input raises an ``InvalidInput`` subclass; its ``code`` and message go in the error body.

How an uploaded image becomes model input (``decode_image``):

1. Size guard: ``width * height`` of the source image, read from the file header before any pixel is decoded,
   must not exceed ``ImageSpec.max_pixels`` (default 4096 * 4096), else ``ImageTooLarge``. Pillow's global
   ``Image.MAX_IMAGE_PIXELS`` is neither changed nor relied on (if it trips first, that is ImageTooLarge too).
   ``source_pixels`` stops here: what decoding a file will cost is known before any file is decoded.
2. Animated images (GIF, APNG, WebP, ...): the first frame is used.
3. 16-bit grayscale ("I;16", and "I" clipped to 0..65535) becomes 8-bit as round(v / 257): 65535 -> 255,
   the whole range kept (neither clipped at 255 nor cut to the high byte).
4. Transparency (RGBA, LA, PA, a transparent palette entry or colour key) is composited onto a BLACK
   background: transparent pixels become 0, as in MNIST-style data (white strokes on black).
5. Other modes (CMYK, YCbCr, P, 1, F, ...) go through Pillow's ``convert``, to "L" for a 1-channel model
   (ITU-R 601-2 luma, L = 0.299 R + 0.587 G + 0.114 B) or "RGB" for a 3-channel one (gray is replicated).
6. Only if the size differs, resize to (width, height) with ``Image.Resampling.BILINEAR`` (which widens its
   support when shrinking, so it averages rather than drops pixels). The aspect ratio is not kept.

Unidentifiable, truncated or corrupt files and empty bytes raise ``InvalidImage``; in a batch the message starts
with the image's 0-based position in the request ("image 3: cannot identify image file"). EPS is refused:
loading it runs Ghostscript on the upload.

``.npy`` input never unpickles. Layouts: (N, C, H, W), (N, H, W, C), and for 1-channel models (N, H, W) or one
(H, W) image; dtype uint8 (0..255) or float (finite, 0..1, scaled by ``to_uint8``).
"""

from __future__ import annotations

import base64
import binascii
import io
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import List, Optional, Tuple, TypeVar

import numpy as np
from PIL import Image, UnidentifiedImageError

from service.core.errors import InvalidInput

T = TypeVar("T")

class InvalidImage(InvalidInput):
    code = "invalid_image"


class ImageTooLarge(InvalidInput):
    code = "image_too_large"


class InvalidArray(InvalidInput):
    code = "invalid_array"


@dataclass(frozen=True)
class ImageSpec:
    """The model's input image: channels (1 -> "L", 3 -> "RGB"), height and width."""

    channels: int  # 1 or 3
    height: int
    width: int
    max_pixels: int = 4096 * 4096  # decompression-bomb guard on the SOURCE image (width * height)

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels!r}")
        for name in ("height", "width", "max_pixels"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")


_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_REFUSED_FORMATS = frozenset({"EPS"})  # EpsImagePlugin shells out to Ghostscript on load()


def decode_image(data: bytes, spec: ImageSpec) -> np.ndarray:
    """Any Pillow-readable image (PNG, JPEG, BMP, GIF first frame, WebP, TIFF...) -> uint8 (C, H, W)."""
    return _opened(data, spec, lambda source: _decoded(source, spec))


def source_pixels(data: bytes, spec: ImageSpec) -> int:
    """``width * height`` of an image file from its header alone: microseconds whatever the size, because
    nothing is decoded. The same refusals as ``decode_image`` for what a header shows (empty or unidentifiable
    data, EPS, more than ``spec.max_pixels``); a file whose pixel data is broken is only found by decoding.
    A PNG's size is read from its IHDR chunk directly (always the first chunk, at a fixed offset): opening it
    with Pillow costs ~25 us, as much again as decoding a 28x28 digit, and decoding opens it anyway."""
    size = _png_size(data)
    if size is None:
        return _opened(data, spec, lambda source: source.width * source.height)
    _check_size(*size, spec)
    return size[0] * size[1]


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_size(data: bytes) -> Optional[Tuple[int, int]]:
    """(width, height) from a PNG's IHDR chunk (PNG spec 11.2.2), or None when ``data`` does not start like a
    well-formed PNG: Pillow then reads (or refuses) it."""
    if len(data) < 24 or not data.startswith(_PNG_SIGNATURE) or data[8:16] != b"\x00\x00\x00\x0dIHDR":
        return None
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    return (width, height) if 0 < width < 2**31 and 0 < height < 2**31 else None


def _check_size(width: int, height: int, spec: ImageSpec) -> None:
    if width * height > spec.max_pixels:
        raise ImageTooLarge(f"image is {width}x{height} pixels; the limit is {spec.max_pixels} pixels")


def _opened(data: bytes, spec: ImageSpec, use: Callable[[Image.Image], T]) -> T:
    """``use(image)`` on the image in ``data``, opened (its header read) and checked against rule 1 and the
    refused formats; every way Pillow fails on client data becomes an ``InvalidInput``."""
    if not data:
        raise InvalidImage("empty image data")
    try:
        with Image.open(io.BytesIO(data)) as source:
            if source.format in _REFUSED_FORMATS:
                raise InvalidImage(f"{source.format} images are not accepted")
            _check_size(*source.size, spec)  # from the header: nothing decoded yet
            return use(source)
    except InvalidInput:
        raise
    # The Warning is an exception only under `-W error`: the warnings filters are process-wide and not
    # thread-safe, so we leave them alone and rely on our own max_pixels check above.
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLarge(str(exc)) from exc
    except UnidentifiedImageError as exc:  # its message embeds a BytesIO repr: say it plainly instead
        raise InvalidImage("cannot identify image file") from exc
    except Exception as exc:  # noqa: BLE001
        # Pillow's plugins raise OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError... on
        # malformed data (its own fuzz harness catches Exception for that reason); all are the client's fault.
        raise InvalidImage(f"cannot decode image: {exc}") from exc


def _decoded(source: Image.Image, spec: ImageSpec) -> np.ndarray:
    """Rules 2-6 of the module docstring on an opened image -> uint8 (C, H, W)."""
    source.load()  # decode now, inside _opened's try, so truncated data fails there and not later
    img = _to_mode(source, "L" if spec.channels == 1 else "RGB")
    if img.size != (spec.width, spec.height):
        img = img.resize((spec.width, spec.height), Image.Resampling.BILINEAR)
    pixels = np.array(img, dtype=np.uint8)  # copy: (H, W) for "L", (H, W, 3) for "RGB"
    if pixels.ndim == 2:
        return pixels[None]  # (1, H, W); a fresh array, already C-contiguous
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))  # (H, W, C) -> (C, H, W)


def _to_mode(img: Image.Image, mode: str) -> Image.Image:
    """Rules 3-5 of the module docstring: 16-bit scaling, alpha onto black, then Pillow's convert."""
    if img.mode.startswith("I"):  # "I;16", "I;16B", "I;16L", "I;16N", "I"
        wide = np.asarray(img).astype(np.int64)
        gray = ((np.clip(wide, 0, 65535) + 128) // 257).astype(np.uint8)  # round(v / 257); 65535 -> 255
        key = img.info.get("transparency")
        if isinstance(key, int):  # a 16-bit colour key (PNG tRNS): transparent means black, as in rule 4
            gray[wide == key] = 0
        img = Image.fromarray(gray)
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")  # also turns a palette / colour-key transparency into an alpha channel
        black = Image.new("RGB", rgba.size)
        black.paste(rgba, mask=rgba.getchannel("A"))  # out = rgb * a / 255 (+ black * (1 - a / 255))
        img = black
    if img.mode not in ("1", "L", "RGB", "F"):
        img = img.convert("RGB")  # CMYK, YCbCr, LAB, HSV, P have no direct path to every target
    return img if img.mode == mode else img.convert(mode)


def decode_images(blobs: Sequence[bytes], spec: ImageSpec) -> np.ndarray:
    """Image files -> uint8 (N, C, H, W), N >= 1; errors name the 0-based index of the failing image."""
    if len(blobs) == 0:
        raise InvalidInput("at least one image is required")
    batch = np.empty((len(blobs), spec.channels, spec.height, spec.width), dtype=np.uint8)
    for index, image in enumerate(_each(decode_image, blobs, spec)):
        batch[index] = image
    return batch


def sources_pixels(blobs: Sequence[bytes], spec: ImageSpec) -> int:
    """The source pixels of all these image files, from their headers (``source_pixels``): what decoding them
    would cost, known before any is decoded. Errors name the image, as in ``decode_images``."""
    return sum(_each(source_pixels, blobs, spec))


def _each(fn: Callable[[bytes, ImageSpec], T], blobs: Sequence[bytes], spec: ImageSpec) -> Iterator[T]:
    for index, data in enumerate(blobs):
        try:
            result = fn(data, spec)
        except InvalidInput as exc:
            raise type(exc)(f"image {index}: {exc}") from exc
        yield result


def decode_base64_images(items: Sequence[str], spec: ImageSpec) -> np.ndarray:
    """Base64 strings or data URLs ("data:image/png;base64,...") -> uint8 (N, C, H, W)."""
    return decode_images(base64_files(items), spec)


def base64_files(items: Sequence[str]) -> List[bytes]:
    """Base64 strings or data URLs -> the image files' bytes; errors name the item's 0-based index."""
    blobs = []
    for index, item in enumerate(items):
        try:
            blobs.append(_b64decode(item))
        except InvalidImage as exc:
            raise InvalidImage(f"image {index}: {exc}") from exc
    return blobs


def _b64decode(item: str) -> bytes:
    if not isinstance(item, str):
        raise InvalidImage(f"expected a base64 string, got {type(item).__name__}")
    if item.startswith("data:"):
        header, sep, item = item.partition(",")
        if not sep or not header.endswith(";base64"):
            raise InvalidImage("data URL must be base64-encoded ('data:<type>;base64,<data>')")
    # Be liberal in what we accept: MIME line breaks, the URL-safe alphabet, missing padding. Anything else
    # (stray characters) is rejected rather than silently skipped, which b64decode does without validate=True.
    item = "".join(item.split()).translate(_URLSAFE_TO_STD)
    item += "=" * (-len(item) % 4)
    try:
        return base64.b64decode(item, validate=True)
    except (binascii.Error, ValueError) as exc:  # ValueError: non-ASCII characters
        raise InvalidImage(f"invalid base64: {exc}") from exc


_URLSAFE_TO_STD = str.maketrans("-_", "+/")


def decode_npy_array(data: bytes) -> np.ndarray:
    """Generic ``.npy`` reader (no pickle, no ``.npz``) -> a writeable array; raises ``InvalidArray``."""
    return _read_npy(data).copy(order="K")


def _read_npy(data: bytes) -> np.ndarray:
    """A read-only view of the array in `data`. We read the header ourselves because np.load allocates the
    claimed shape before noticing the payload is short (100 bytes could ask for terabytes) and accepts .npz."""
    fmt = np.lib.format
    stream = io.BytesIO(data)
    try:
        version = fmt.read_magic(stream)
        if version == (1, 0):
            shape, fortran_order, dtype = fmt.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, fortran_order, dtype = fmt.read_array_header_2_0(stream)
        else:
            raise InvalidArray(f"unsupported .npy format version {version[0]}.{version[1]}")
    except InvalidArray:
        raise
    except Exception as exc:  # noqa: BLE001  (ValueError, EOFError, SyntaxError from the header literal)
        raise InvalidArray(f"not a valid .npy file: {exc}") from exc
    if dtype.hasobject:
        raise InvalidArray("object arrays are not accepted (they need pickle)")
    if any(d < 0 for d in shape) or dtype.itemsize == 0:
        raise InvalidArray(f"invalid .npy header: shape {shape}, dtype {dtype}")
    count = math.prod(shape)
    expected = count * dtype.itemsize
    offset = stream.tell()
    if len(data) - offset != expected:
        raise InvalidArray(f".npy header promises {expected} bytes ({dtype}, {shape}), got {len(data) - offset}")
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=offset)  # zero-copy, read-only
    return flat.reshape(shape[::-1]).T if fortran_order else flat.reshape(shape)


def decode_npy(data: bytes, spec: ImageSpec) -> np.ndarray:
    """application/x-npy batch -> uint8 (N, C, H, W).

    Accepts (N, C, H, W), (N, H, W, C), and for 1-channel models (N, H, W) or one (H, W) image; dtype uint8
    (0..255) or float (0..1, finite). Never unpickles.
    """
    return npy_pixels(npy_batch(data, spec))


def npy_batch(data: bytes, spec: ImageSpec) -> np.ndarray:
    """``decode_npy``'s first half: a read-only (N, C, H, W) view of the array in ``data``, its header, shape
    and dtype checked, no pixel read or copied yet (so its rows can be counted before any work)."""
    array = _read_npy(data)
    c, h, w = spec.channels, spec.height, spec.width
    shape = array.shape
    if c == 1 and array.ndim == 2 and shape == (h, w):
        array = array[None, None]
    elif c == 1 and array.ndim == 3 and shape[1:] == (h, w):
        array = array[:, None]
    elif array.ndim == 4 and shape[1:] == (c, h, w):
        pass  # checked first: when C == H == W both layouts match and NCHW is the documented default
    elif array.ndim == 4 and shape[1:] == (h, w, c):
        array = array.transpose(0, 3, 1, 2)
    else:
        accepted = f"(N, {c}, {h}, {w}) or (N, {h}, {w}, {c})"
        if c == 1:
            accepted += f" or (N, {h}, {w}) or ({h}, {w})"
        raise InvalidArray(f"array shape {shape} does not match the model: expected {accepted}")
    if array.shape[0] == 0:
        raise InvalidArray("the batch is empty")
    if array.dtype != np.uint8 and array.dtype.kind != "f":
        raise InvalidArray(f"dtype {array.dtype} is not accepted: send uint8 (0..255) or float (0..1)")
    return array


def npy_pixels(array: np.ndarray) -> np.ndarray:
    """``decode_npy``'s second half: ``npy_batch``'s view -> a C-contiguous uint8 copy; float pixels must be
    finite and in [0, 1]."""
    if array.dtype == np.uint8:
        return np.array(array, dtype=np.uint8, order="C")  # copy: the input view is read-only
    if not np.isfinite(array).all():
        raise InvalidArray("float pixels must be finite (found NaN or inf)")
    low, high = float(array.min()), float(array.max())
    if low < 0.0 or high > 1.0:
        # Reject rather than clip: floats in 0..255 clipped to 0..1 would silently become an all-white image.
        raise InvalidArray(f"float pixels must lie in [0, 1], got [{low:g}, {high:g}]; send uint8 for 0..255")
    return to_uint8(array)


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """Float pixels in [0, 1] (typically (N, C, H, W)) -> C-contiguous uint8: rint(x * 255), clipped.

    np.rint rounds half to even. NaN maps to 0 explicitly, because casting NaN to uint8 is platform-defined.
    """
    pixels = np.asarray(pixels)
    if pixels.dtype.kind != "f":
        raise TypeError(f"to_uint8 expects a float array, got dtype {pixels.dtype}")
    # float16 is too coarse near 255 to round correctly; float32 and float64 keep their precision.
    scaled = np.multiply(pixels, 255, dtype=np.result_type(pixels.dtype, np.float32))
    np.rint(scaled, out=scaled)
    np.nan_to_num(scaled, copy=False, nan=0.0)
    np.clip(scaled, 0, 255, out=scaled)
    return scaled.astype(np.uint8, order="C")


def encode_png(image: np.ndarray) -> bytes:
    """uint8 (C, H, W), C in {1, 3} -> PNG bytes (mode "L" or "RGB"); lossless."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise TypeError(f"encode_png expects uint8, got dtype {image.dtype}")
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"encode_png expects shape (C, H, W) with C in {{1, 3}}, got {image.shape}")
    hwc = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(hwc)).save(buffer, format="PNG")
    return buffer.getvalue()


def encode_png_base64(image: np.ndarray) -> str:
    """uint8 (C, H, W) -> plain base64 PNG (no data-URL prefix)."""
    return base64.b64encode(encode_png(image)).decode("ascii")


def encode_npy(array: np.ndarray) -> bytes:
    """Any non-object array -> ``.npy`` bytes (application/x-npy); object arrays raise ValueError."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()
