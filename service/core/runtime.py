"""The artifact on its device: batch shapes, warm-up and the kernels.

Kernels take and return numpy arrays and run on the batcher's worker threads, never on the event loop; they
are safe to call from several threads at once (TorchScript methods are; the noise cache has a lock). The
artifact is loaded and checked by the contract's own package (``vae_artifact``); everything about the model
comes from its metadata, and the VAE math itself is the artifact's exported ``encode`` / ``decode`` / ``score``.
"""

import logging
import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, FrozenSet, Hashable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from service.core.devices import pin_cpu_numerics, pin_gpu_numerics, resolve_device
from vae_artifact import noise
from vae_artifact.errors import ArtifactError
from vae_artifact.io import file_sha256, load_artifact
from vae_artifact.metadata import KERNELS as METHOD_KERNELS, PRIOR_METHODS, Metadata, latent_outputs

log = logging.getLogger(__name__)

Call = Callable[[torch.Tensor], Tuple[torch.Tensor, ...]]  # a model method on one batch, outputs row-first

# Decoded images per score call when not configured. On CPU a call's cost per row grows past a few dozen
# decodes (docs/results.md), so small calls keep rows from waiting on each other; on a GPU one call should
# fill the device.
SCORE_DECODES = {"cpu": 32, "cuda": 4096}
# The artifact's methods as kernels, and ``prior``: z from the caller's noise and mixture components through
# the artifact's ``sample_prior`` (artifacts whose prior is not N(0, I); /sample draws N(0, I) itself).
KERNELS = (*METHOD_KERNELS, "prior")

__all__ = ["ArtifactError", "KERNELS", "ModelInfo", "ModelRuntime", "SCORE_DECODES", "ScoreCall"]


@dataclass(frozen=True)
class ScoreCall:
    """A score batch's parameters (the batcher batches rows of equal parameters): K, and the latent outputs each
    row also gets (``latent_nn`` from the artifact's ``latent_neighbour_distance`` for the fisher-<c>-nn kinds,
    ``latent_log_density`` from its ``latent_log_density`` for the density-<c> kinds)."""

    k: int
    latent: FrozenSet[str] = frozenset()


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


def _same_prefix(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether the rows both hold are bit-identical (calls of different sizes cover different numbers of rows)."""
    n = min(len(a), len(b))
    return np.array_equal(a[:n], b[:n])


def cpu_call_sizes(largest: int) -> List[int]:
    """The sizes CPU calls run at: every size up to 8 (score calls, K decodes a row, are all at most 8 rows at
    the default K: padding them would cost whole rows of K decodes), then 12, 16 and multiples of 8, and the
    largest. A call is padded by at most 7 rows, and the shapes stay few: oneDNN keeps a primitive per shape
    (megabytes each for a 28x28 decoder's transposed convolutions), so every size up to 64 would cost hundreds
    of MB a process."""
    sizes = set(range(1, 9)) | {12, 16} | set(range(24, largest, 8)) | {largest}
    return sorted(n for n in sizes if n <= largest)


class ModelRuntime:
    """A loaded artifact bound to one device; its kernels may run on several threads at once.

    Batch shapes. A call never holds more rows than the largest bucket, and a row's result never depends on
    how many rows share its call (bit for bit). A call runs at one of a few sizes (``call_sizes``), zero-padded
    up to the smallest that fits: on a GPU the buckets, each warmed once; on CPU, where padding costs compute,
    a finer grid (``cpu_call_sizes``: exact up to 8 rows, then steps of 4 and 8). Each size is a shape the
    executor and oneDNN keep state for, so the grid bounds memory and warm-up as well. ``warm_up`` also checks
    that every call size gives each row the bits of the largest call, and pads smaller calls up to the size
    from which they do. On CPU with MKL's strict reproducible mode (``devices.pin_cpu_numerics``) they all do;
    without it, small calls take other kernels whose last bits differ (below 16 rows on AVX-512 machines). On
    a GPU cuDNN and cuBLAS pick kernels by shape, so the probe usually pads every call to the largest bucket,
    which costs a GPU almost nothing (an H200 encodes 64 rows in the time of one); ``devices.pin_gpu_numerics``
    keeps each shape on one full-precision kernel.
    """

    def __init__(self, path: Path, *, device: str = "auto", buckets: Sequence[int] = (4, 16, 64),
                 max_score_decodes: Optional[int] = None, expected_sha256: Optional[str] = None) -> None:
        if not buckets or min(buckets) < 1:
            raise ValueError(f"buckets must be positive batch sizes, got {list(buckets)}")
        pin_cpu_numerics()  # before the first matrix product of this process, which warm_up runs
        self.device = resolve_device(device)
        if self.device.type == "cuda":
            pin_gpu_numerics()
        self.module, self.metadata = load_artifact(Path(path), self.device, expected_sha256=expected_sha256)
        meta: Metadata = self.metadata
        if not meta.prior.is_standard and not all(hasattr(self.module, name) for name in PRIOR_METHODS):
            raise ArtifactError(f"{path}: the {meta.prior.name} prior needs the artifact's {list(PRIOR_METHODS)}")
        # The latent statistics' methods it lists (a latent bank, a latent density): output name -> method.
        self.latent_methods = latent_outputs(meta)
        missing = [method for method in self.latent_methods.values() if not hasattr(self.module, method)]
        if missing:
            raise ArtifactError(f"{path}: the metadata lists {missing}, the module lacks them")
        self.info = ModelInfo(
            channels=meta.image.channels, height=meta.image.height, width=meta.image.width,
            latent_dim=meta.latent_dim, num_dims=meta.image.num_dims, score_k=meta.scoring.k,
            noise_seed=meta.scoring.noise_seed, version=meta.created,
            sha256=expected_sha256.lower() if expected_sha256 else file_sha256(Path(path)),  # a pin was checked
        )
        self.buckets = sorted(set(int(b) for b in buckets))
        self.call_sizes = self.buckets if self.device.type == "cuda" else cpu_call_sizes(self.buckets[-1])
        self.max_score_decodes = max_score_decodes or SCORE_DECODES.get(self.device.type, SCORE_DECODES["cuda"])
        self._noise: "OrderedDict[int, torch.Tensor]" = OrderedDict()
        self._noise_lock = threading.Lock()
        self._pin = self.device.type == "cuda"
        # Per kernel, the smallest call size from which every row has the bits it has in the largest call:
        # smaller calls are padded up to it. Measured by warm_up.
        self.exact_from: Dict[str, int] = {kernel: 1 for kernel in (*KERNELS, *self.latent_methods)}

    # -- kernels -------------------------------------------------------------------------------
    def run(self, kernel: str, rows: np.ndarray, params: Hashable = None) -> Dict[str, np.ndarray]:
        """The batcher's one entry point: ``kernel`` on ``rows``; ``params`` is the score's K or ScoreCall."""
        if kernel == "score":
            score = self._score_params(params)
            return self.score(rows, score.k, latent=score.latent)
        if kernel in ("encode", "decode"):
            return self.encode(rows) if kernel == "encode" else self.decode(rows)
        if kernel == "prior":
            return self.sample_prior(rows)
        raise ValueError(f"unknown kernel {kernel!r}; known: {list(KERNELS)}")

    @torch.inference_mode()
    def encode(self, images: np.ndarray) -> Dict[str, np.ndarray]:
        """uint8 (N, C, H, W) -> mu, logvar (N, D) float32."""
        return self._calls(self.module.encode, images, ("mu", "logvar"), self.call_sizes, self.exact_from["encode"])

    @torch.inference_mode()
    def decode(self, z: np.ndarray) -> Dict[str, np.ndarray]:
        """float32 (N, D) -> pixel means (N, C, H, W) float32 in [0, 1]."""
        return self._calls(lambda t: (self.module.decode(t),), z, ("pixels",), self.call_sizes,
                           self.exact_from["decode"])

    @torch.inference_mode()
    def sample_prior(self, rows: np.ndarray) -> Dict[str, np.ndarray]:
        """float32 (N, D + 1), each row eps (D) then its mixture component's index -> z (N, D) float32, by the
        artifact's ``sample_prior``: a gather and a multiply-add per row, so every call size gives a row the
        same bits (zero padding is component 0 with eps 0)."""
        def call(t: torch.Tensor) -> Tuple[torch.Tensor, ...]:
            return (self.module.sample_prior(t[:, :-1].contiguous(), t[:, -1].long()),)

        return self._calls(call, rows, ("z",), self.call_sizes, self.exact_from["prior"])

    @property
    def latent_outputs(self) -> FrozenSet[str]:
        """The latent outputs this artifact computes (``latent_nn``, ``latent_log_density``)."""
        return frozenset(self.latent_methods)

    @torch.inference_mode()
    def latent(self, images: np.ndarray, output: str) -> Dict[str, np.ndarray]:
        """uint8 (N, C, H, W) -> {output: (N,)}: the artifact's method of that latent statistic
        (``latent_nn``: latent_neighbour_distance, float32; ``latent_log_density``: latent_log_density, float64)."""
        if output not in self.latent_methods:
            raise ValueError(f"this artifact has no {output!r}; it has {sorted(self.latent_methods)}")
        method = getattr(self.module, self.latent_methods[output])
        return self._calls(lambda t: (method(t),), images, (output,), self.call_sizes, self.exact_from[output])

    @torch.inference_mode()
    def score(self, images: np.ndarray, k: int, latent: FrozenSet[str] = frozenset()) -> Dict[str, np.ndarray]:
        """uint8 (N, C, H, W) -> iw_ll, elbo, rec, kl (N,) and log_w (N, K); noise fixed per K, shared by rows.
        With ``latent`` also those latent outputs (N,), by their kernels in the same batcher call."""
        if latent:
            return {**self.score(images, k), **{name: v for output in sorted(latent)
                                               for name, v in self.latent(images, output).items()}}
        eps_k = self._noise_for(k)

        def score(x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
            eps = noise.for_rows(eps_k, x.shape[0])  # (K, D) -> (K, B, D), no copy
            iw, elbo, rec, kl, log_w = self.module.score(x, eps)
            return iw, elbo, rec, kl, log_w.t()  # log_w (K, B) -> (B, K): rows first, like the rest

        # Measured at the calibration's K; at another K a row's K decodes are a decode batch of another size.
        sizes = self.score_sizes(k)
        exact_from = max(self.exact_from["score"], math.ceil(self.exact_from["decode"] / k))
        if not self.metadata.scoring.batch_invariant:  # an older score: one call size keeps a row's bits
            exact_from = sizes[-1]
        # A large K caps the rows per call below what the probe found: one size then, which is exact too.
        return self._calls(score, images, ("iw_ll", "elbo", "rec", "kl", "log_w"), sizes, min(exact_from, sizes[-1]))

    def score_sizes(self, k: int) -> List[int]:
        """Call sizes of a score: a row costs K decodes, so rows per call shrink as K grows."""
        cap = max(1, min(self.call_sizes[-1], self.max_score_decodes // k))
        return [b for b in self.call_sizes if b < cap] + [cap]

    def max_rows(self, kernel: str, params: Hashable = None) -> int:
        """Most rows in one call of ``kernel`` (for a score, with K = ``params``)."""
        return self.score_sizes(self._score_params(params).k)[-1] if kernel == "score" else self.call_sizes[-1]

    def _score_params(self, params: Hashable) -> ScoreCall:
        """A score's ``params``: ScoreCall, or K alone (None: the artifact's K)."""
        return params if isinstance(params, ScoreCall) else ScoreCall(int(params or self.info.score_k))

    def warm_up(self, score_k: Optional[int] = None, rounds: int = 2) -> float:
        """Check the call sizes' bits, then run every kernel at every call size, ``rounds`` times, so the
        profiling executor has specialised and oneDNN has built each shape before the first request."""
        started = time.perf_counter()
        c, h, w, d = self.info.channels, self.info.height, self.info.width, self.info.latent_dim
        k = score_k or self.info.score_k
        self._probe_exact_sizes(k)
        for _ in range(rounds):
            for b in self.call_sizes:
                self.encode(np.zeros((b, c, h, w), np.uint8))
                self.decode(np.zeros((b, d), np.float32))
            for b in self.score_sizes(k):
                self.score(np.zeros((b, c, h, w), np.uint8), k)
            if not self.metadata.prior.is_standard:
                for b in self.call_sizes:
                    self.sample_prior(np.zeros((b, d + 1), np.float32))
            for output in self.latent_methods:
                for b in self.call_sizes:
                    self.latent(np.zeros((b, c, h, w), np.uint8), output)
        return time.perf_counter() - started

    def _probe_exact_sizes(self, k: int) -> None:
        """Per kernel, the smallest call size from which every row is bit-identical to the same row in the
        largest call (every call size, every output, every row). Calls smaller than that are padded up to it,
        so a row's bits never depend on its company or on how a batch was formed."""
        rng = np.random.default_rng(0)
        c, h, w, d = self.info.channels, self.info.height, self.info.width, self.info.latent_dim
        top = self.call_sizes[-1]
        latents = rng.standard_normal((top, d)).astype(np.float32)
        # Noise images and the model's own samples: a difference in summation order can hide on inputs whose
        # importance weights one sample dominates (noise), and show on typical ones (many weigh in).
        samples = np.round(self.decode(latents)["pixels"] * 255.0).astype(np.uint8)
        noise = rng.integers(0, 256, size=(top, c, h, w), dtype=np.uint8)
        images = np.where(np.arange(top)[:, None, None, None] % 2 == 0, samples, noise)
        score_sizes = self.score_sizes(k)
        scored = images[:max(16, score_sizes[-1])]

        def score_in_calls_of(n: int) -> Dict[str, np.ndarray]:
            # Every probe image at every call size: a summation order that differs only for some inputs
            # (the K weights' log-sum-exp) gets several chances to show.
            parts = [self.score(scored[i:i + n], k) for i in range(0, len(scored) - len(scored) % n, n)]
            return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}

        calls = {
            "encode": (lambda n: self.encode(images[:n]), self.call_sizes),
            "decode": (lambda n: self.decode(latents[:n]), self.call_sizes),
            "score": (score_in_calls_of, score_sizes),
        }
        for output in self.latent_methods:
            calls[output] = (lambda n, output=output: self.latent(images[:n], output), self.call_sizes)
        if not self.metadata.prior.is_standard:
            component = rng.integers(0, self.metadata.prior.components, size=(top, 1))
            mixture = np.concatenate([latents, component], axis=1).astype(np.float32)
            calls["prior"] = (lambda n: self.sample_prior(mixture[:n]), self.call_sizes)
        for kernel, (run, sizes) in calls.items():
            self.exact_from[kernel] = 1  # every probe at its own call size
            reference = run(sizes[-1])
            # Smallest first, with the padding found so far in force: a call the device has to split (out of
            # memory) is then computed in halves padded as serving will pad them, not in smaller calls than any
            # served call runs at, which would make every size that needs a split look inexact.
            differ = []
            for n in sizes[:-1]:
                if n >= self.exact_from[kernel] and not all(
                        _same_prefix(out, reference[name]) for name, out in run(n).items()):
                    differ.append(n)
                    self.exact_from[kernel] = next(m for m in sizes if m > n)
            if differ:
                log.warning("%s: rows differ from the %d-row call at call sizes %s; smaller calls are padded",
                            kernel, sizes[-1], differ)
        log.info("call sizes %s; every row as in the largest call from %s rows", self.call_sizes, self.exact_from)

    def gpu_memory(self) -> Dict[str, int]:
        if self.device.type != "cuda":
            return {}
        return {"allocated": torch.cuda.memory_allocated(self.device), "reserved": torch.cuda.memory_reserved(self.device)}

    # -- helpers -------------------------------------------------------------------------------
    def _calls(self, fn: Call, rows: np.ndarray, names: Tuple[str, ...], sizes: List[int],
               exact_from: int) -> Dict[str, np.ndarray]:
        """``fn`` over ``rows`` in calls of at most the largest size, each zero-padded up to the smallest call
        size that holds its rows and is at least ``exact_from``; outputs row-first, padding cut off."""
        def padded_size(n: int) -> int:
            return next(b for b in sizes if b >= max(n, exact_from))

        step = sizes[-1]
        parts = [self._padded_call(fn, self._to_device(np.ascontiguousarray(rows[start:start + step])), padded_size)
                 for start in range(0, len(rows), step)]
        # .cpu() is the device sync point.
        out = {name: torch.cat([p[i] for p in parts]).cpu().numpy() for i, name in enumerate(names)}
        assert all(len(v) == len(rows) for v in out.values()), \
            f"kernel returned {[len(v) for v in out.values()]} rows, expected {len(rows)}"
        return out

    def _padded_call(self, fn: Call, x: torch.Tensor, padded_size: Callable[[int], int]) -> Tuple[torch.Tensor, ...]:
        """``fn`` on the rows of x zero-padded to ``padded_size(len(x))``, outputs cut back to len(x). If the
        device runs out of memory, each half is retried the same way, padding rule included, so a row's
        bits do not depend on whether its call was split (down to single rows, then the error stands)."""
        n = x.shape[0]
        size = padded_size(n)
        try:
            full = x if size == n else torch.cat([x, x.new_zeros((size - n,) + tuple(x.shape[1:]))])
            return tuple(out[:n] for out in fn(full))
        except torch.OutOfMemoryError:
            if n <= 1:
                raise
            if self.device.type == "cuda":
                torch.cuda.empty_cache()  # hand the failed attempt's blocks back before retrying
            log.warning("out of memory on %d rows; retrying in halves", size)
            first, second = (self._padded_call(fn, part, padded_size) for part in (x[: n // 2], x[n // 2:]))
            return tuple(torch.cat([a, b]) for a, b in zip(first, second))

    def _noise_for(self, k: int) -> torch.Tensor:
        """The contract's noise for K samples (``vae_artifact.noise``), on this device, cached per K."""
        with self._noise_lock:
            if k not in self._noise:
                self._noise[k] = noise.scoring_noise(k, self.info.latent_dim, self.info.noise_seed).to(self.device)
                while len(self._noise) > 8:  # K is request-settable: keep only a few noise tensors
                    self._noise.popitem(last=False)
            self._noise.move_to_end(k)
            return self._noise[k]

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(array)
        if self._pin:
            tensor = tensor.pin_memory()  # page-locked memory lets the copy below overlap with compute
        tensor = tensor.to(self.device, non_blocking=self._pin)
        if tensor.dtype == torch.uint8:
            tensor = tensor.float().div_(255.0)  # the contract's input scaling: 8-bit value / 255
        return tensor
