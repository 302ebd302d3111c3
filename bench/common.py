"""What the competitor servers share: the artifact's metadata, input decoding and output shaping.

The naive and LitServe servers do exactly what the service does to a request, written the way a user of
those frameworks would: PNG -> uint8 in the model's mode and size -> float / 255, the artifact's own
``encode`` / ``decode`` / ``score`` under ``torch.inference_mode()``, and the same JSON shape (orjson, like
the service). Output shaping (anomaly rows, sample PNGs) reuses the service's pure functions so every server
sends the same bytes. The artifact is read with the contract's own package (``vae_artifact``), like the
service reads it. Importing this module does not import torch; the servers do, when they start.
"""

import io
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Sequence

import numpy as np
import orjson
from PIL import Image

from vae_artifact.metadata import Metadata, read_metadata

__all__ = ["ModelShape", "model_shape", "read_metadata"]


@dataclass(frozen=True)
class ModelShape:
    channels: int
    height: int
    width: int
    latent_dim: int
    score_k: int
    noise_seed: int

    @property
    def num_dims(self) -> int:
        return self.channels * self.height * self.width


def model_shape(metadata: Metadata) -> ModelShape:
    image, scoring = metadata.image, metadata.scoring
    return ModelShape(image.channels, image.height, image.width, metadata.latent_dim, scoring.k, scoring.noise_seed)


def decode_png(data: bytes, shape: ModelShape) -> np.ndarray:
    """Image bytes -> uint8 (C, H, W) in the model's mode and size (bilinear resize, like the service)."""
    img = Image.open(io.BytesIO(data)).convert("L" if shape.channels == 1 else "RGB")
    if img.size != (shape.width, shape.height):
        img = img.resize((shape.width, shape.height), Image.Resampling.BILINEAR)
    pixels = np.asarray(img, dtype=np.uint8)
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def decode_npy(data: bytes, shape: ModelShape) -> np.ndarray:
    """An .npy batch, uint8 (N, C, H, W) or (N, H, W) -> uint8 (N, C, H, W). No pickle."""
    array = np.load(io.BytesIO(data), allow_pickle=False)
    if array.ndim == 3:
        array = array[:, None]
    if array.shape[1:] != (shape.channels, shape.height, shape.width) or array.dtype != np.uint8:
        raise ValueError(f"expected uint8 (N, {shape.channels}, {shape.height}, {shape.width}), got "
                         f"{array.dtype} {array.shape}")
    return array


def load_model(path: Path, threads: int, device: str = "cpu"):
    """The artifact's module on ``device`` (checked and in eval mode, as the service loads it), with the
    bench's intra-op thread count."""
    import torch

    from vae_artifact.io import load_artifact

    torch.set_num_threads(threads)
    return load_artifact(path, map_location=device)[0]


def score_noise(shape: ModelShape, k: int, device: str = "cpu"):
    """The artifact contract's noise, (K, D), on ``device``."""
    from vae_artifact import noise

    return noise.scoring_noise(k, shape.latent_dim, shape.noise_seed).to(device)


def to_tensor(images: np.ndarray, device: str = "cpu"):
    """uint8 (N, C, H, W) -> float32 in [0, 1] on ``device``: the contract's 8-bit value / 255."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(images)).to(device).float().div_(255.0)


def to_numpy(tensor) -> np.ndarray:
    return tensor.cpu().numpy()


def score_kinds(metadata):
    """The artifact's score kinds as our service offers them (``service.core.scoring.ScoreKinds``): the latent-bank
    kinds too when the artifact has a bank, so every server scores the artifact's default kind."""
    from service.core.scoring import ScoreKinds
    from vae_artifact.metadata import lists_latent_bank

    return ScoreKinds.from_metadata(metadata, neighbours=lists_latent_bank(metadata))


def run_score(module, x, noise, neighbours: bool = False) -> Dict[str, np.ndarray]:
    """The artifact's score(x, eps) with eps the fixed noise shared by every row, as the service calls it; with
    ``neighbours`` (a kind that ``needs_neighbours``) also its latent_neighbour_distance(x), as the service does."""
    from vae_artifact.noise import for_rows

    iw, elbo, rec, kl, log_w = module.score(x, for_rows(noise, x.shape[0]))
    outputs = {"iw_ll": to_numpy(iw), "elbo": to_numpy(elbo), "rec": to_numpy(rec), "kl": to_numpy(kl),
               "log_w": to_numpy(log_w.t())}
    if neighbours:
        outputs["latent_nn"] = to_numpy(module.latent_neighbour_distance(x))
    return outputs


def encode_body(mu: np.ndarray, logvar: np.ndarray) -> bytes:
    return orjson.dumps({"mu": mu.tolist(), "logvar": logvar.tolist(), "z": None, "seed": None})


def anomaly_body(outputs: Dict[str, np.ndarray], shape: ModelShape, kind, k: int, bits=None) -> bytes:
    """The service's /anomaly-score JSON for the artifact's default score kind ``kind`` (a
    ``service.core.scoring.ScoreKind``), built with its own pure functions (alpha 0.01, upper tail). ``bits``: the
    kind's compressed sizes of the images (``ScoreKinds.complexity_bits``), the work our service does too."""
    from service.core import scoring

    rows = scoring.score_rows(outputs, num_dims=shape.num_dims, calibration=kind.calibration, alpha=0.01,
                              tail="upper", k=k, complexity_bits=bits, kind=kind)
    summary = scoring.calibration_summary(kind.calibration, 0.01, "upper", k)
    return orjson.dumps({"score": kind.name, "k": k, "scores": rows, "calibration": summary})


def sample_body(pixels: np.ndarray, z: np.ndarray, seed: int) -> bytes:
    """The service's /sample JSON: one base64 PNG per image, the latents and the seed."""
    from service.core import codecs

    images: List[str] = [codecs.encode_png_base64(im) for im in codecs.to_uint8(pixels)]
    return orjson.dumps({"images": images, "z": z.tolist(), "seed": seed})


def split_rows(array: np.ndarray, sizes: Sequence[int]) -> List[np.ndarray]:
    return np.split(array, np.cumsum(sizes)[:-1])


def median_ms(fn: Callable[[], object], calls: int, sync: Callable[[], None] = lambda: None, warm: int = 5) -> float:
    """Median wall time of ``fn`` in ms over ``calls`` calls after ``warm`` unmeasured ones; ``sync`` waits for
    queued device work (CUDA runs asynchronously) before each clock read."""
    for _ in range(warm):
        fn()
    sync()
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - started)
    return 1000.0 * statistics.median(times)
