"""Process-group setup for `torchrun`, and the one collective training needs (summing metrics).

Launched plainly, training is a single process of world size 1 and nothing here touches torch.distributed.
Under `torchrun` (RANK / WORLD_SIZE / LOCAL_RANK in the environment) every process joins one group: NCCL on
CUDA, gloo on CPU, and each process drives the GPU numbered by its LOCAL_RANK.
"""

import logging
import os
from dataclasses import dataclass
from typing import Dict

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0 alone evaluates, exports, writes checkpoints and the report."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1 or dist.is_initialized()


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {name!r}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' was asked for but torch.cuda.is_available() is False")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def setup(device: str = "auto") -> DistContext:
    """Join the torchrun process group if there is one; otherwise a world of one on ``device``."""
    if "RANK" not in os.environ:
        return DistContext(rank=0, world_size=1, device=resolve_device(device))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    ctx = DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), device=dev)
    log.info("rank %d of %d on %s (%s)", ctx.rank, ctx.world_size, dev, dist.get_backend())
    return ctx


def cleanup(ctx: DistContext, *, together: bool = False) -> None:
    """Leave the process group if still in it. ``together`` (after training, on every rank): wait for the
    others first, so all leave at once and rank 0 then evaluates and exports alone; a rank that destroyed its
    gloo group while rank 0 still held its end was seen to abort at exit ("terminate called without an active
    exception", 1 run of a CI suite). Without it (any exit, also a failed rank's) it waits for nobody."""
    if ctx.enabled and dist.is_initialized():
        if together:
            dist.barrier()
        dist.destroy_process_group()


def all_reduce_sums(totals: Dict[str, float], ctx: DistContext) -> Dict[str, float]:
    """Sum each value over all ranks (every rank gets the result); a no-op in a world of one."""
    if not ctx.enabled:
        return dict(totals)
    keys = sorted(totals)
    # float64 so that sums of per-image nats over many images and ranks lose nothing.
    buf = torch.tensor([float(totals[k]) for k in keys], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return dict(zip(keys, buf.tolist()))
