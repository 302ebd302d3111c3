"""The artifact on its device: loading, batch shapes, warm-up and the three kernels.

Kernels take and return numpy arrays and run on the batcher's worker threads, never on the event loop; they
are safe to call from several threads at once (TorchScript methods are; the noise cache has a lock). Everything about the model comes from the artifact's metadata.json (DESIGN.md, artifact contract);
the VAE math itself is the artifact's exported ``encode`` / ``decode`` / ``score``.
"""

import hashlib
import json
import logging
import math
import os
import threading
import time
import warnings
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

log = logging.getLogger(__name__)

SUPPORTED_FORMAT = 1
METADATA_FILE = "metadata.json"
DEFAULT_SCORE_K = 32
KERNELS = ("encode", "decode", "score")
# Decoded images per score call when not configured. On CPU a call's cost grows with its size (K=32 already
# fills the caches: 4 rows per call score as fast per row as 64), so small calls keep rows from waiting on
# each other; on a GPU one call should fill the device.
SCORE_DECODES = {"cpu": 128, "cuda": 4096}


class ArtifactError(RuntimeError):
    """The artifact is missing, unreadable, tampered with, or of a format this service cannot serve."""


@contextmanager
def _quiet_torchscript() -> Iterator[None]:
    # TorchScript is deprecated from torch 2.11 on and warns on load; the artifact format is TorchScript.
    with warnings.catch_warnings():
        for category in (DeprecationWarning, FutureWarning):
            warnings.filterwarnings("ignore", message=r".*(TorchScript|torch\.jit).*", category=category)
        yield


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_sha256(module: torch.nn.Module) -> str:
    """The artifact contract's weights hash: per state-dict entry, sorted by name, name|dtype|shape| + bytes."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask, lowered by a cgroup CPU quota (a container's limit)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = None
    try:  # cgroup v2
        limit, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        quota = None if limit == "max" else int(limit) / int(period)
    except (OSError, ValueError):
        try:  # cgroup v1
            limit = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
            period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
            quota = limit / period if limit > 0 and period > 0 else None
        except (OSError, ValueError):
            pass
    return max(1, min(cpus, math.ceil(quota))) if quota else max(1, cpus)


def default_workers(device: torch.device) -> int:
    """Model worker threads: one per usable CPU core (up to 8) on CPU, one per GPU."""
    return 1 if device.type == "cuda" else min(8, available_cpus())


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ArtifactError(f"device {name!r} requested but CUDA is not available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ArtifactError(f"device {name!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    return device


def load_artifact(path: Path, device: torch.device) -> Tuple[torch.jit.ScriptModule, Dict[str, Any]]:
    """The one loader: TorchScript module + metadata, checked; ArtifactError with the reason otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"model artifact not found: {path}")
    extra = {METADATA_FILE: ""}
    try:
        with _quiet_torchscript():
            module = torch.jit.load(str(path), map_location=device, _extra_files=extra)
    except Exception as exc:  # damaged zips raise RuntimeError, ValueError or zipfile errors
        raise ArtifactError(f"{path} is not a readable TorchScript artifact ({type(exc).__name__}: {exc})") from exc
    try:
        meta = json.loads(extra[METADATA_FILE] or "null")
    except ValueError as exc:
        raise ArtifactError(f"{path}: embedded metadata.json is not valid JSON ({exc})") from exc
    if not isinstance(meta, dict) or not isinstance(meta.get("format_version"), int):
        raise ArtifactError(f"{path}: no metadata.json with an integer format_version inside")
    if meta["format_version"] > SUPPORTED_FORMAT:
        raise ArtifactError(
            f"{path}: artifact format {meta['format_version']} is newer than this service supports "
            f"({SUPPORTED_FORMAT}); upgrade the service"
        )
    try:
        image, latent_dim = meta["model"]["image"], int(meta["model"]["latent_dim"])
        int(image["channels"]), int(image["height"]), int(image["width"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"{path}: metadata lacks model.image / model.latent_dim ({exc!r})") from exc
    missing = [m for m in KERNELS if not hasattr(module, m)]
    if missing or latent_dim < 1:
        raise ArtifactError(f"{path}: artifact does not export {missing} (needs encode, decode, score)")
    if meta.get("weights_sha256") != weights_sha256(module):
        raise ArtifactError(f"{path}: weights do not match the weights_sha256 in its metadata (corrupt or tampered)")
    return module, meta


@dataclass(frozen=True)
class ModelInfo:
    channels: int
    height: int
    width: int
    latent_dim: int
    num_dims: int
    score_k: int  # the K the calibration scores were computed with
    noise_seed: int
    version: str
    sha256: str  # of the artifact file


class ModelRuntime:
    """A loaded artifact bound to one device; its kernels may run on several threads at once.

    Batch shapes. A call never holds more rows than the largest bucket, and a row's result never depends on
    how many rows share its call (bit for bit). On a GPU every call is zero-padded up to the smallest
    bucket that fits: few shapes, each warmed once. On CPU padding costs compute (17 rows padded to 64 cost
    64 rows), so a call runs at its exact size, padded only up to the smallest size from which this model
    gives identical rows on this machine: small batches take other matrix-product kernels whose last bits
    differ (below 4 rows, typically). ``warm_up`` measures that size per kernel by running the same rows at
    many batch sizes; a kernel whose rows differ at any probed size from the smallest bucket up is padded to
    the buckets instead, as on a GPU.
    """

    def __init__(self, path: Path, *, device: str = "auto", buckets: Sequence[int] = (4, 16, 64),
                 max_score_decodes: Optional[int] = None, expected_sha256: Optional[str] = None) -> None:
        if not buckets or min(buckets) < 1:
            raise ValueError(f"buckets must be positive batch sizes, got {list(buckets)}")
        self.device = resolve_device(device)
        sha = file_sha256(Path(path)) if Path(path).is_file() else ""
        if expected_sha256 and sha != expected_sha256.lower():
            raise ArtifactError(f"{path}: sha256 {sha or '(missing file)'} is not the pinned {expected_sha256}")
        self.module, self.metadata = load_artifact(Path(path), self.device)
        self.module.eval()
        image, scoring = self.metadata["model"]["image"], self.metadata.get("scoring", {})
        c, h, w = int(image["channels"]), int(image["height"]), int(image["width"])
        self.info = ModelInfo(
            channels=c, height=h, width=w, latent_dim=int(self.metadata["model"]["latent_dim"]), num_dims=c * h * w,
            score_k=int(scoring.get("k", DEFAULT_SCORE_K)), noise_seed=int(scoring.get("noise_seed", 0)),
            version=str(self.metadata.get("created", "unknown")), sha256=sha,
        )
        self.buckets = sorted(set(int(b) for b in buckets))
        self.max_score_decodes = max_score_decodes or SCORE_DECODES.get(self.device.type, SCORE_DECODES["cuda"])
        self._noise: "OrderedDict[int, torch.Tensor]" = OrderedDict()
        self._noise_lock = threading.Lock()
        self._pin = self.device.type == "cuda"
        # Per kernel: None = pad every call up to a bucket; n = run at the exact size, at least n rows.
        # Padding to buckets until warm_up has measured otherwise.
        self.exact_from: Dict[str, Optional[int]] = {kernel: None for kernel in KERNELS}

    # -- kernels -------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode(self, images: np.ndarray) -> Dict[str, np.ndarray]:
        """uint8 (N, C, H, W) -> mu, logvar (N, D) float32."""
        chunks = self._chunks(images, self.buckets, self.exact_from["encode"])
        return self._collect([self._split_on_oom(self.module.encode, x) for x in chunks], ("mu", "logvar"), len(images))

    @torch.inference_mode()
    def decode(self, z: np.ndarray) -> Dict[str, np.ndarray]:
        """float32 (N, D) -> pixel means (N, C, H, W) float32 in [0, 1]."""
        chunks = self._chunks(z, self.buckets, self.exact_from["decode"])
        return self._collect([self._split_on_oom(lambda t: (self.module.decode(t),), t) for t in chunks],
                             ("pixels",), len(z))

    @torch.inference_mode()
    def score(self, images: np.ndarray, k: int) -> Dict[str, np.ndarray]:
        """uint8 (N, C, H, W) -> iw_ll, elbo, rec, kl (N,) and log_w (N, K); noise fixed per K, shared by rows."""
        noise = self._noise_for(k)

        def score(x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
            eps = noise.unsqueeze(1).expand(k, x.shape[0], self.info.latent_dim)  # (K, D) -> (K, B, D), no copy
            iw, elbo, rec, kl, log_w = self.module.score(x, eps)
            return iw, elbo, rec, kl, log_w.t()  # log_w (K, B) -> (B, K): rows first, like the rest

        exact_from = self.exact_from["score"]
        if exact_from is not None:  # the K decodes of a row are a batch of K: a few rows reach the safe size
            exact_from = max(exact_from, math.ceil(self.buckets[0] / k))
        chunks = self._chunks(images, self.score_buckets(k), exact_from)
        return self._collect([self._split_on_oom(score, x) for x in chunks],
                             ("iw_ll", "elbo", "rec", "kl", "log_w"), len(images))

    def score_buckets(self, k: int) -> List[int]:
        """Buckets for a score call: a row costs K decodes, so rows per call shrink as K grows."""
        cap = max(1, min(self.buckets[-1], self.max_score_decodes // k))
        return [b for b in self.buckets if b < cap] + [cap]

    def max_rows(self, kernel: str, k: int = 0) -> int:
        return self.score_buckets(k)[-1] if kernel == "score" else self.buckets[-1]

    def warm_up(self, score_k: Optional[int] = None, rounds: int = 3) -> float:
        """Measure the exact-size batching (CPU), then run every kernel at its call sizes, ``rounds`` times,
        so the profiling executor has specialised each shape before the first request."""
        started = time.perf_counter()
        c, h, w, d = self.info.channels, self.info.height, self.info.width, self.info.latent_dim
        k = score_k or self.info.score_k
        if self.device.type == "cpu":
            self._probe_exact_sizes(k)
        for _ in range(rounds):
            for b in self.buckets:
                self.encode(np.zeros((b, c, h, w), np.uint8))
                self.decode(np.zeros((b, d), np.float32))
            # A lone score row may run unpadded (its K decodes are a batch already): warm that shape too.
            for b in sorted(set(self.score_buckets(k)) | {1}):
                self.score(np.zeros((b, c, h, w), np.uint8), k)
        return time.perf_counter() - started

    def _probe_exact_sizes(self, k: int) -> None:
        """Per kernel, the smallest batch size from which the same rows give the same bits at every probed
        size up to the largest call; None (pad to buckets) when a size from the smallest bucket up differs."""
        rng = np.random.default_rng(0)
        c, h, w, d = self.info.channels, self.info.height, self.info.width, self.info.latent_dim
        top = self.buckets[-1]
        images = rng.integers(0, 256, size=(top, c, h, w), dtype=np.uint8)
        latents = rng.standard_normal((top, d)).astype(np.float32)
        calls = {
            "encode": (lambda n: self.encode(images[:n])["mu"], top),
            "decode": (lambda n: self.decode(latents[:n])["pixels"], top),
            "score": (lambda n: self.score(images[:n], k)["log_w"], self.score_buckets(k)[-1]),
        }
        for kernel, (run, largest) in calls.items():
            self.exact_from[kernel] = None
            reference = run(largest)[:1]  # padded to a bucket: the established result
            sizes = sorted({n for n in (1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 17, 24, 31, 32, 33, 48, 63, 64)
                            if n < largest} | {max(1, largest - 1)})
            self.exact_from[kernel] = 1  # every probe at its exact size
            differ = [n for n in sizes if not np.array_equal(run(n)[:1], reference)]
            padded = any(n >= self.buckets[0] for n in differ)
            if padded:
                log.warning("%s: rows differ at batch sizes %s; padding every call to %s", kernel, differ,
                            self.buckets)
            self.exact_from[kernel] = None if padded else max(differ, default=0) + 1
        log.info("exact-size batching from %s rows (None: padded to buckets %s)", self.exact_from, self.buckets)

    def gpu_memory(self) -> Dict[str, int]:
        if self.device.type != "cuda":
            return {}
        return {"allocated": torch.cuda.memory_allocated(self.device), "reserved": torch.cuda.memory_reserved(self.device)}

    # -- helpers -------------------------------------------------------------------------------
    def _split_on_oom(self, fn: Callable[[torch.Tensor], Tuple[torch.Tensor, ...]],
                      x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """Run fn on x; if the device runs out of memory, retry on halves (down to single rows)."""
        try:
            return fn(x)
        except torch.OutOfMemoryError:
            if x.shape[0] <= 1:
                raise
            if self.device.type == "cuda":
                torch.cuda.empty_cache()  # hand the failed attempt's blocks back before retrying
            log.warning("out of memory on %d rows; retrying in halves", x.shape[0])
            half = x.shape[0] // 2
            first, second = self._split_on_oom(fn, x[:half]), self._split_on_oom(fn, x[half:])
            return tuple(torch.cat([a, b]) for a, b in zip(first, second))

    def _noise_for(self, k: int) -> torch.Tensor:
        """The contract's noise: randn((K, D)) from a CPU generator seeded with scoring.noise_seed."""
        with self._noise_lock:
            if k not in self._noise:
                gen = torch.Generator(device="cpu").manual_seed(self.info.noise_seed)
                self._noise[k] = torch.randn((k, self.info.latent_dim), generator=gen).to(self.device)
                while len(self._noise) > 8:  # K is request-settable: keep only a few noise tensors
                    self._noise.popitem(last=False)
            self._noise.move_to_end(k)
            return self._noise[k]

    def _chunks(self, rows: np.ndarray, buckets: List[int], exact_from: Optional[int]) -> Iterator[torch.Tensor]:
        """Split rows into calls of at most the largest bucket, each zero-padded up to a bucket size
        (``exact_from`` None) or up to ``exact_from`` rows."""
        step = buckets[-1]
        for start in range(0, len(rows), step):
            chunk = rows[start:start + step]
            if exact_from is None:
                size = next(b for b in buckets if b >= len(chunk))
            else:
                size = max(len(chunk), exact_from)
            if size == len(chunk):
                yield self._to_device(np.ascontiguousarray(chunk))
                continue
            padded = np.zeros((size,) + rows.shape[1:], dtype=rows.dtype)
            padded[: len(chunk)] = chunk
            yield self._to_device(padded)

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(array)
        if self._pin:
            tensor = tensor.pin_memory()  # page-locked memory lets the copy below overlap with compute
        tensor = tensor.to(self.device, non_blocking=self._pin)
        if tensor.dtype == torch.uint8:
            tensor = tensor.float().div_(255.0)  # the contract's input scaling: 8-bit value / 255
        return tensor

    @staticmethod
    def _collect(parts: List[Tuple[torch.Tensor, ...]], names: Tuple[str, ...], n: int) -> Dict[str, np.ndarray]:
        # .cpu() is the device sync point; padded rows are cut off here.
        out = {name: torch.cat([p[i] for p in parts]).cpu().numpy()[:n] for i, name in enumerate(names)}
        assert all(len(v) == n for v in out.values()), f"kernel returned {[len(v) for v in out.values()]} rows, expected {n}"
        return out
