"""Input complexity: the length of a lossless compression of an image, in bits (Serrà et al. 2020).

A generic compressor is a model of "any image"; its code length L(x) is the input-complexity estimate that the
complexity-corrected anomaly scores subtract from the VAE's NLL: a score kind ``nll-minus-<compressor>`` is
-log p(x) - ln 2 * L(x). Training (calibration) and the service (serving) both call these functions, so their
byte counts agree by construction; the artifact records each compressor's exact parameters and library
version (``describe``), and a reader offers a kind only when ``supports`` says it reproduces them.

Both sides compress the same pixels: the 8-bit image the service receives, snapped onto the model's pixel
levels (``snap``), so the compressor measures exactly the image the likelihood is computed for. CPU-bound:
the service runs it in its thread pool, never on the event loop.
"""

import bz2
import io
import math
import zlib
from typing import Callable, Dict, Optional

import numpy as np
import PIL
from PIL import Image

# Each compressor's parameters are fixed: calibration and serving must produce identical byte counts.
PARAMS: Dict[str, Dict] = {
    "png": {"compress_level": 9, "optimize": False},  # Pillow PNG; optimize would try other settings
    "zlib": {"level": 9},  # zlib.compress of the raw C-order (C, H, W) bytes, zlib header and checksum included
    "bz2": {"compresslevel": 9},  # bz2.compress of the same raw bytes
}


def snap(images: np.ndarray, levels: int) -> np.ndarray:
    """uint8 (N, C, H, W) -> the same images on the model's grid of ``levels`` values, back in 8 bits.

    round(round(u * (L - 1) / 255) * 255 / (L - 1)): the identity for 256 levels, a 0/255 threshold at
    127.5 for 2 levels (binarised models), exactly what the model's own ``quantize`` does to u / 255.
    """
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"expected uint8 (N, C, H, W) images, got {images.dtype} {images.shape}")
    if levels == 256:
        return images
    steps = float(levels - 1)
    return np.round(np.round(images * (steps / 255.0)) * (255.0 / steps)).astype(np.uint8)


def _png(image: np.ndarray) -> int:
    array = image[0] if image.shape[0] == 1 else np.ascontiguousarray(image.transpose(1, 2, 0))  # (C,H,W)->(H,W,C)
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", **PARAMS["png"])
    return len(buf.getvalue())


def _zlib(image: np.ndarray) -> int:
    return len(zlib.compress(np.ascontiguousarray(image).tobytes(), PARAMS["zlib"]["level"]))


def _bz2(image: np.ndarray) -> int:
    return len(bz2.compress(np.ascontiguousarray(image).tobytes(), PARAMS["bz2"]["compresslevel"]))


_BYTES: Dict[str, Callable[[np.ndarray], int]] = {"png": _png, "zlib": _zlib, "bz2": _bz2}
COMPRESSORS = tuple(_BYTES)


def compressed_bits(images: np.ndarray, compressor: str, levels: int = 256) -> np.ndarray:
    """Compressed size in bits (8 x bytes, headers included) of each uint8 (N, C, H, W) image -> float64 (N,)."""
    if compressor not in _BYTES:
        raise ValueError(f"unknown compressor {compressor!r}; known: {list(COMPRESSORS)}")
    size = _BYTES[compressor]
    return np.array([8.0 * size(image) for image in snap(images, levels)], dtype=np.float64)


def describe(compressor: str) -> Dict:
    """What the artifact records about a compressor: its name, exact parameters and library version."""
    library = {"png": f"Pillow {PIL.__version__}", "zlib": f"zlib {zlib.ZLIB_RUNTIME_VERSION}",
               "bz2": "bz2 (libbzip2, Python stdlib)"}[compressor]
    inputs = ("8-bit image snapped to the model's pixel levels, "
              + ("mode L (C=1) or RGB (C=3), H x W" if compressor == "png" else "raw C-order (C, H, W) bytes"))
    return {"name": compressor, "params": dict(PARAMS[compressor]), "library": library, "input": inputs,
            "units": "bits (8 x compressed bytes, headers included)"}


def supports(spec: Optional[dict]) -> bool:
    """Whether this code reproduces the compressor an artifact describes (same name, same parameters)."""
    return isinstance(spec, dict) and spec.get("name") in _BYTES and spec.get("params") == PARAMS[spec["name"]]


def corrected(nll: np.ndarray, bits: Optional[np.ndarray]) -> np.ndarray:
    """The score of a kind: the NLL (nats) itself when ``bits`` is None, else nll - ln 2 * bits."""
    return nll if bits is None else nll - math.log(2.0) * bits
