"""Where the model runs: the device, how many CPU cores this process may use, how many processes and model
workers share them, and the CPU numerics they ask for. Imports torch only where a device is resolved: the
supervisor of several server processes sizes itself with this module and never loads torch."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Optional

from vae_artifact.errors import ArtifactError

if TYPE_CHECKING:
    import torch


class DeviceUnavailable(ArtifactError):
    """The requested device does not exist here. An ArtifactError, so the CLI refuses it like an unusable
    artifact: a message and exit status 2, never a half-started server."""


# MKL's strict conditional numerical reproducibility: every matrix product gives the same bits for a row
# whatever the number of rows beside it (by default, on AVX-512, batches below 16 rows take other kernels).
# That lets a lone request run at its own size and still match the same row in a full batch, for a fraction of
# a millisecond on a lone call (docs/results.md); ignored by builds without MKL. MKL reads it once, at the first
# matrix product.
CPU_NUMERICS: Dict[str, str] = {"MKL_CBWR": "AUTO,STRICT"}


def pin_cpu_numerics() -> None:
    """Ask for batch-invariant CPU numerics, unless the operator chose otherwise. Must run before the
    process's first matrix product to take effect; the runtime's warm-up measures what it got either way."""
    for name, value in CPU_NUMERICS.items():
        os.environ.setdefault(name, value)


def pin_gpu_numerics() -> None:
    """Full float32 and the same kernel for the same shape on CUDA (process-wide; the service loads one model).

    PyTorch lets cuDNN's convolutions use TF32 by default: about 1e-3 relative error, enough to move a served
    score by hundredths of a nat from what the artifact's calibration and any CPU computes (a float64
    cross-check on a GPU showed it). Benchmark mode picks an algorithm per
    shape by timing, and some algorithms accumulate with atomics: either would let the same request get other
    bits on another run. A VAE's convolutions are small; full precision costs little on a GPU.
    """
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def release_free_memory() -> bool:
    """Hand the C heap's free pages back to the system (glibc's ``malloc_trim``); False where there is none.

    Warm-up runs every call size once, up to the largest; glibc keeps what those calls freed, and with
    several processes per machine that is tens of MB each that no later call may need (the benchmark's memory
    target is met with the trim and missed without it).
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim this way
        trim = None
    if trim is None:
        return False
    trim(0)
    return True


CGROUP = Path("/sys/fs/cgroup")


def available_cpus(cgroup: Optional[Path] = None) -> int:
    """CPUs this process may use: its affinity mask, lowered by a cgroup CPU quota (a container's limit), read
    under ``cgroup`` (default ``CGROUP``; v2's cpu.max, else v1's cpu/cpu.cfs_quota_us and cpu.cfs_period_us)."""
    cgroup = CGROUP if cgroup is None else cgroup
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = None
    try:  # cgroup v2
        limit, period = (cgroup / "cpu.max").read_text().split()[:2]
        quota = None if limit == "max" else int(limit) / int(period)
    except (OSError, ValueError):
        try:  # cgroup v1
            limit = int((cgroup / "cpu" / "cpu.cfs_quota_us").read_text())
            period = int((cgroup / "cpu" / "cpu.cfs_period_us").read_text())
            quota = limit / period if limit > 0 and period > 0 else None
        except (OSError, ValueError):
            pass
    return max(1, min(cpus, math.ceil(quota))) if quota else max(1, cpus)


def default_workers(device: torch.device, processes: int = 1) -> int:
    """Model worker threads of one server process: its share of the usable CPU cores (up to 8) on CPU, one
    per GPU."""
    return 1 if device.type == "cuda" else max(1, min(8, available_cpus() // processes))


def default_torch_threads(device: torch.device, workers: int, processes: int = 1) -> int:
    """Intra-op threads per worker on CPU: the usable cores shared out between every process's workers."""
    import torch

    return max(1, available_cpus() // (workers * processes)) if device.type == "cpu" else torch.get_num_threads()


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda`` or ``cuda:N``; DeviceUnavailable otherwise."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceUnavailable(f"device {name!r} requested but CUDA is not available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceUnavailable(
                f"device {name!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    return device


def default_processes(device: str, cpus: int) -> int:
    """One per usable core on CPU (up to 8); one on a GPU, where one process batches for the whole device."""
    if device.startswith("cuda") or (device == "auto" and Path("/dev/nvidiactl").exists() and _cuda()):
        return 1
    return max(1, min(8, cpus))


def _cuda() -> bool:
    import torch  # only on a host with an NVIDIA driver: the supervisor itself otherwise never loads torch

    return torch.cuda.is_available()
