"""Training images/s of model variants side by side: alternating rounds in one process, the same threads.

    python -m training speed full lean lean+fused --side 28 --steps 10 --rounds 6
    python -m training speed full lean+fused --side 32 --channels 3

A variant is ``<arch>[@<hidden>][+fused][+cl][+compile]``: the conv layout (``training.model``), the hidden
width, fused AdamW, channels_last, torch.compile. Each round runs every variant for ``--steps`` training
steps (batch 64: forward, backward, clipping, AdamW) on the same batches, so a machine whose load changes
slows every variant in a round alike: the per-round ratios to the first variant are what to read, with the
load average printed before and after. Prints the median images/s of each variant and its ratio.
"""

import argparse
import os
import time
from typing import Callable, Dict, List

import numpy as np
import torch

from training import objectives
from training.model import VAE, VAEConfig, num_parameters

BATCH = 64


def build(name: str, channels: int, side: int) -> Dict:
    arch, *flags = name.split("+")
    arch, _, hidden = arch.partition("@")
    torch.manual_seed(0)
    vae = VAE(VAEConfig(channels=channels, height=side, width=side, arch=arch, hidden=int(hidden or 256)))
    if "cl" in flags:
        vae = vae.to(memory_format=torch.channels_last)
    fused = "fused" in flags
    return {"vae": vae, "model": torch.compile(vae) if "compile" in flags else vae, "cl": "cl" in flags,
            "opt": torch.optim.AdamW(vae.parameters(), lr=2e-3, fused=fused or None), "rates": []}


def run(variant: Dict, batches: torch.Tensor, steps: int) -> float:
    """Images/s of ``steps`` training steps."""
    gen = torch.Generator().manual_seed(1)
    started = time.perf_counter()
    for i in range(steps):
        x = batches[i % len(batches)]
        if variant["cl"]:
            x = x.contiguous(memory_format=torch.channels_last)
        rec, kl, _ = variant["model"](x, torch.randn(x.shape[0], variant["vae"].config.latent_dim, generator=gen))
        loss = objectives.beta_vae_loss(rec.float(), kl.float(), 1.0, 0.0)
        variant["opt"].zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(variant["vae"].parameters(), 100.0)
        variant["opt"].step()
    return BATCH * steps / (time.perf_counter() - started)


def compare(names: List[str], *, channels: int, side: int, steps: int, rounds: int,
            report: Callable[[str], None] = print) -> Dict[str, Dict]:
    """Every variant's images/s in ``rounds`` alternating rounds (8-bit noise images: the speed does not depend
    on their content); ``report`` gets a line per round and the load average before and after."""
    gen = torch.Generator().manual_seed(0)
    batches = torch.randint(0, 256, (8, BATCH, channels, side, side), generator=gen).float() / 255
    variants = {name: build(name, channels, side) for name in names}
    for variant in variants.values():
        run(variant, batches, 3)  # warm-up (and torch.compile's compile)
    report(f"load before: {os.getloadavg()}")
    for r in range(rounds):
        for variant in variants.values():
            variant["rates"].append(run(variant, batches, steps))
        report(f"round {r}: {({name: round(v['rates'][-1]) for name, v in variants.items()})}")
    report(f"load after: {os.getloadavg()}")
    return variants
