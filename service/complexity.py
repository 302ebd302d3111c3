"""Input complexity: lossless compressed size of an image in bits, for the complexity-corrected scores.

A score kind ``nll-minus-<compressor>`` is -log p(x) - ln 2 * L(x) (Serrà et al. 2020): the artifact's NLL
minus the code length of a generic compressor. Its calibration scores were computed at training time by
``training/complexity.py``; this is the service's copy of the same few lines (``service`` never imports
``training``), and a test asserts both give identical numbers on real images. The artifact records each
compressor's parameters (``scoring.kinds[kind].complexity``); ``supports`` refuses any it cannot reproduce.

Both sides compress the same pixels: the 8-bit image snapped onto the model's pixel levels, i.e. exactly
the image the likelihood is computed for. Runs in the thread pool, never on the event loop.
"""

import bz2
import io
import zlib
from typing import Callable, Dict, Optional

import numpy as np
from PIL import Image

PARAMS: Dict[str, Dict] = {
    "png": {"compress_level": 9, "optimize": False},  # Pillow PNG
    "zlib": {"level": 9},  # zlib.compress of the raw C-order (C, H, W) bytes, header and checksum included
    "bz2": {"compresslevel": 9},  # bz2.compress of the same raw bytes
}


def snap(images: np.ndarray, levels: int) -> np.ndarray:
    """uint8 (N, C, H, W) -> round(round(u * (L - 1) / 255) * 255 / (L - 1)): the model's grid, in 8 bits."""
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


def supports(spec: Optional[dict]) -> bool:
    """Whether this service reproduces the compressor an artifact describes (same name, same parameters)."""
    return isinstance(spec, dict) and spec.get("name") in _BYTES and spec.get("params") == PARAMS[spec["name"]]


def compressed_bits(images: np.ndarray, compressor: str, levels: int = 256) -> np.ndarray:
    """Compressed size in bits (8 x bytes, headers included) of each uint8 (N, C, H, W) image -> float64 (N,)."""
    if compressor not in _BYTES:
        raise ValueError(f"unknown compressor {compressor!r}; known: {sorted(_BYTES)}")
    size = _BYTES[compressor]
    return np.array([8.0 * size(image) for image in snap(images, levels)], dtype=np.float64)
