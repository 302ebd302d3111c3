"""The benchmark's workloads, and the request bodies they send.

Images are 28x28 grayscale PNGs: MNIST test digits when ``--images idx:DIR`` points at the IDX files, else
scikit-learn's 8x8 digits scaled up to 28x28 (shipped with the package: no download). Every server converts
them to the model's own shape. The .npy batch is already in the model's shape (uint8, N x C x H x W).
"""

import gzip
import io
from dataclasses import dataclass
from pathlib import Path
from typing import List

import numpy as np
from PIL import Image

from bench.common import ModelShape
from bench.loadgen import Request

BOUNDARY = "benchboundary7MA4YWxkTrZu0gW"
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"
NPY = "application/x-npy"
POOL = 32  # distinct PNG bodies, cycled


@dataclass(frozen=True)
class Workload:
    name: str
    kernel: str  # encode | score | decode: which batcher queue (and LitServe API) serves it
    concurrency: int
    rows: int
    description: str


WORKLOADS = (
    Workload("encode_c1", "encode", 1, 1, "/encode, one 28x28 PNG per request, concurrency 1"),
    Workload("encode_c16", "encode", 16, 1, "/encode, one 28x28 PNG per request, concurrency 16"),
    Workload("encode_c64", "encode", 64, 1, "/encode, one 28x28 PNG per request, concurrency 64"),
    Workload("anomaly_c16", "score", 16, 1, "/anomaly-score at the artifact's K, one PNG, concurrency 16"),
    Workload("npy256_c1", "encode", 1, 256, "/encode, one request of 256 images as .npy, concurrency 1"),
    Workload("sample64_c4", "decode", 4, 64, "/sample with n=64 (base64 PNGs back), concurrency 4"),
)


def load_images(source: str, count: int = 256) -> np.ndarray:
    """uint8 (count, 28, 28) grayscale digits."""
    if source.startswith("idx:"):
        path = Path(source[4:]) / "t10k-images-idx3-ubyte.gz"
        with gzip.open(path, "rb") as fh:
            data = fh.read()
        n, h, w = (int.from_bytes(data[i:i + 4], "big") for i in (4, 8, 12))
        return np.frombuffer(data, np.uint8, offset=16).reshape(n, h, w)[:count].copy()
    if source != "digits":
        raise ValueError(f"--images must be digits or idx:DIR, got {source!r}")
    from sklearn.datasets import load_digits

    small = (load_digits().images[:count] * (255.0 / 16.0)).astype(np.uint8)
    return np.stack([np.asarray(Image.fromarray(im).resize((28, 28), Image.Resampling.BILINEAR)) for im in small])


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def multipart(files: List[bytes], content_type: str = "image/png", filename: str = "digit.png") -> bytes:
    parts = [f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
             f"Content-Type: {content_type}\r\n\r\n".encode() + f + b"\r\n" for f in files]
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def to_model_shape(images: np.ndarray, shape: ModelShape) -> np.ndarray:
    """uint8 (N, 28, 28) -> uint8 (N, C, H, W), resized like the servers resize (bilinear)."""
    mode = "L" if shape.channels == 1 else "RGB"
    out = []
    for im in images:
        img = Image.fromarray(im).convert(mode)
        if img.size != (shape.width, shape.height):
            img = img.resize((shape.width, shape.height), Image.Resampling.BILINEAR)
        a = np.asarray(img, dtype=np.uint8)
        out.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
    return np.stack(out)


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def build_request(workload: Workload, images: np.ndarray, shape: ModelShape, raw_npy: bool = True) -> Request:
    """The HTTP request of a workload. ``raw_npy=False``: the .npy goes as a multipart part (LitServe)."""
    if workload.kernel in ("encode", "score") and workload.rows == 1:
        path = "/encode" if workload.kernel == "encode" else "/anomaly-score"
        bodies = [multipart([png(images[k % len(images)])]) for k in range(POOL)]
        return Request("POST", path, bodies, MULTIPART, rows=1)
    if workload.kernel == "encode":
        batch = npy(to_model_shape(images[:workload.rows], shape))
        if raw_npy:
            return Request("POST", "/encode", [batch], NPY, rows=workload.rows)
        return Request("POST", "/encode", [multipart([batch], NPY, "batch.npy")], MULTIPART, rows=workload.rows)
    body = f'{{"n": {workload.rows}, "seed": 1}}'.encode()
    return Request("POST", "/sample", [body], "application/json", rows=workload.rows)
