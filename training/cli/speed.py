"""``python -m training speed``: training images/s of model layouts side by side, in alternating rounds.

    python -m training speed full lean lean+fused --side 28 --steps 10 --rounds 6
    python -m training speed full lean+fused --side 32 --channels 3

A variant is ``<arch>[@<hidden>][+fused][+cl][+compile]``: the conv layout, the hidden width, fused AdamW,
channels_last, torch.compile. Read the per-round ratios to the first variant: a machine whose load changes slows
every variant of a round alike.
"""

import argparse
from typing import List, Optional

import numpy as np

from training.model import num_parameters
from training.speed import compare


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training speed", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("variants", nargs="+", help="e.g. full lean lean+fused (the first is the reference)")
    p.add_argument("--side", type=int, default=28)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--steps", type=int, default=10, help="training steps per variant per round")
    p.add_argument("--rounds", type=int, default=6)
    args = p.parse_args(argv)
    variants = compare(args.variants, channels=args.channels, side=args.side, steps=args.steps, rounds=args.rounds,
                       report=lambda line: print(line, flush=True))
    reference = np.array(variants[args.variants[0]]["rates"])
    for name, variant in variants.items():
        rates = np.array(variant["rates"])
        ratios = rates / reference
        print(f"{name:22s} {num_parameters(variant['vae']):>9d} params  {np.median(rates):7.0f} img/s  "
              f"x{np.median(ratios):.2f} (rounds {ratios.min():.2f}-{ratios.max():.2f})")
    return 0
