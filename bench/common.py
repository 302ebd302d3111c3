"""What the competitor servers share: the artifact's metadata, input decoding and output shaping.

The naive and LitServe servers do what the service does to a request, written the way a user of those
frameworks would: PNG -> uint8 in the model's mode and size -> float / 255, the artifact's own ``encode`` /
``decode`` / ``score`` under ``torch.inference_mode()``, the artifact's default score kind computed with the
contract's own math (``vae_artifact``: the compressor, the Fisher combination, the conformal p-values), and
a response of the service's JSON shape (orjson, like the service). Nothing here imports the service: a peer
server knows the artifact, as any user's server would. Importing this module does not import torch; the
servers do, when they start.
"""

import base64
import io
import math
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, FrozenSet, List, Optional, Sequence

import numpy as np
import orjson
from PIL import Image

from vae_artifact import complexity
from vae_artifact.calibration import Calibration, importance_stats
from vae_artifact.combination import Combination
from vae_artifact.metadata import LATENT_STATISTICS, Metadata, latent_outputs, preferred_kind, read_metadata

__all__ = ["ModelShape", "ScoreKind", "default_kind", "model_shape", "read_metadata", "score_kinds"]


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


def multipart_files(body: bytes, content_type: str) -> List[bytes]:
    """The file parts of a well-formed multipart body, split on its boundary (no streaming parser)."""
    boundary = content_type.split("boundary=", 1)[1].split(";")[0].strip('"')
    files = []
    for part in body.split(b"--" + boundary.encode())[1:-1]:
        head, _, data = part.partition(b"\r\n\r\n")
        if b"filename=" in head:
            files.append(data[:-2])  # the CRLF before the next delimiter
    return files


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


@dataclass(frozen=True)
class ScoreKind:
    """One of the artifact's anomaly score kinds, read from its metadata: its compressor, its Fisher combination,
    its calibration scores."""

    name: str
    compressor: Optional[str]
    combination: Optional[Combination]
    calibration: Optional[Calibration]
    levels: int

    @property
    def latent_needs(self) -> FrozenSet[str]:
        """The artifact's latent outputs its score needs (``latent_nn``, ``latent_log_density``)."""
        return frozenset() if self.combination is None else self.combination.latent_needs

    def bits(self, images: np.ndarray) -> Optional[np.ndarray]:
        """The images' compressed sizes, when the kind has a compressor."""
        return None if self.compressor is None else complexity.compressed_bits(images, self.compressor, self.levels)

    def scores(self, outputs: Dict[str, np.ndarray], bits: Optional[np.ndarray]) -> np.ndarray:
        nll = -outputs["iw_ll"].astype(np.float64)
        if self.combination is not None:
            return self.combination.scores(nll, outputs["elbo"], bits, outputs)
        return complexity.corrected(nll, bits)


def score_kinds(metadata: Metadata) -> Dict[str, ScoreKind]:
    """The kinds a server can offer for the artifact: those whose compressor it can reproduce, those that need
    latent outputs only when it computes them, and ``nll`` always."""
    offered = {}
    computed = set(latent_outputs(metadata))
    for name, description in metadata.scoring.kinds.items():
        spec, combined = description.get("complexity"), description.get("combination")
        combination = Combination.from_dict(combined) if combined is not None else None
        if (spec is not None and not complexity.supports(spec)) or (
                combination is not None and not combination.latent_needs <= computed):
            continue
        offered[name] = ScoreKind(name, spec["name"] if spec else None, combination,
                                  Calibration.from_metadata(metadata, name), metadata.levels)
    offered.setdefault("nll", ScoreKind("nll", None, None, Calibration.from_metadata(metadata, "nll"),
                                        metadata.levels))
    return offered


def default_kind(metadata: Metadata) -> ScoreKind:
    """The kind the artifact names as its default, or the contract's preferred one that it offers."""
    offered = score_kinds(metadata)
    name = metadata.scoring.default
    return offered[name if name in offered else preferred_kind(offered)]


def run_score(module, x, noise, latent: FrozenSet[str] = frozenset()) -> Dict[str, np.ndarray]:
    """The artifact's score(x, eps) with eps the fixed noise shared by every row, as the service calls it; and
    the ``latent`` outputs a kind needs (``ScoreKind.latent_needs``) by the artifact's methods, as the service
    does."""
    from vae_artifact.noise import for_rows

    iw, elbo, rec, kl, log_w = module.score(x, for_rows(noise, x.shape[0]))
    outputs = {"iw_ll": to_numpy(iw), "elbo": to_numpy(elbo), "rec": to_numpy(rec), "kl": to_numpy(kl),
               "log_w": to_numpy(log_w.t())}
    outputs.update((output, run_latent(module, x, output)) for output in sorted(latent))
    return outputs


def run_latent(module, x, output: str) -> np.ndarray:
    """One latent statistic (a ``LATENT_STATISTICS`` output) of the rows ``x`` by the artifact's own method."""
    method = dict((out, m) for m, out in LATENT_STATISTICS.values())[output]
    return to_numpy(getattr(module, method)(x))


def encode_body(mu: np.ndarray, logvar: np.ndarray) -> bytes:
    return orjson.dumps({"mu": mu.tolist(), "logvar": logvar.tolist(), "z": None, "seed": None})


def anomaly_body(outputs: Dict[str, np.ndarray], shape: ModelShape, kind: ScoreKind, k: int, bits=None) -> bytes:
    """The service's /anomaly-score JSON for ``kind`` (alpha 0.01, upper tail). ``bits``: the kind's compressed
    sizes of the images (``ScoreKind.bits``), the work the service does too."""
    alpha = 0.01
    score = kind.scores(outputs, bits)
    nll = -outputs["iw_ll"].astype(np.float64)
    stats = importance_stats(outputs["log_w"])
    calibration = kind.calibration if kind.calibration is not None and kind.calibration.k == k else None
    p = calibration.p_values(score) if calibration is not None else [None] * len(score)
    pct = calibration.percentiles(score) if calibration is not None else [None] * len(score)
    latent_nn, log_density = outputs.get("latent_nn"), outputs.get("latent_log_density")
    rows = [{"score_nats": float(score[i]), "complexity_bits": None if bits is None else float(bits[i]),
             "neighbour_distance": None if latent_nn is None else float(latent_nn[i]),
             "latent_density_nats": None if log_density is None else float(-log_density[i]),
             "nll_nats": float(nll[i]), "nll_bits_per_dim": float(nll[i] / (shape.num_dims * math.log(2.0))),
             "nll_se_nats": float(stats["se"][i]) if np.isfinite(stats["se"][i]) else None,
             "ess": float(stats["ess"][i]), "elbo_nats": float(outputs["elbo"][i]),
             "reconstruction_nats": float(outputs["rec"][i]), "kl_nats": float(outputs["kl"][i]),
             "p_value": None if p[i] is None else float(p[i]), "percentile": None if pct[i] is None else float(pct[i]),
             "is_anomaly": None if p[i] is None else bool(p[i] <= alpha)} for i in range(len(score))]
    threshold = calibration.threshold(alpha) if calibration is not None else None
    summary = {"calibrated": calibration is not None, "n": 0 if kind.calibration is None else kind.calibration.n,
               "k": None if kind.calibration is None else kind.calibration.k, "alpha": alpha, "tail": "upper",
               "threshold_nats": threshold if threshold is not None and math.isfinite(threshold) else None,
               "threshold_low_nats": None}
    return orjson.dumps({"score": kind.name, "k": k, "scores": rows, "calibration": summary})


def sample_body(pixels: np.ndarray, z: np.ndarray, seed: int) -> bytes:
    """The service's /sample JSON: one base64 PNG per image, the latents and the seed."""
    images = []
    for image in np.clip(np.rint(pixels * 255.0), 0, 255).astype(np.uint8):
        buffer = io.BytesIO()
        Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)).save(buffer, format="PNG")
        images.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
    return orjson.dumps({"images": images, "z": z.tolist(), "seed": seed})


def default_processes(device: str) -> int:
    """Server processes for ours and the ceiling when not given: one per usable core on CPU (up to 8), one on a
    GPU: what the service itself would choose on this machine outside a container."""
    if device.startswith("cuda"):
        return 1
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


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
