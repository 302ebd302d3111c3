"""``python -m training directions``: the latent directions of an artifact, for attribute edits.

    python -m training directions add --model runs/digits/vae.ts --name thick --positive thick/ --negative thin/
    python -m training directions list --model runs/digits/vae.ts
"""

import argparse
import json
from pathlib import Path
from typing import Optional, Sequence

from training.directions import add_direction
from vae_artifact.metadata import read_metadata

FORMATTER = argparse.ArgumentDefaultsHelpFormatter


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m training directions", description=__doc__.split("\n\n")[0],
                                formatter_class=FORMATTER)
    sub = p.add_subparsers(dest="command", required=True)
    add = sub.add_parser("add", help="add a named direction from example folders (metadata only)",
                         description="Add a custom direction, the mean posterior mean of the positive examples "
                                     "minus that of the negative ones, to the artifact's metadata; the weights "
                                     "and their sha256 stay as they are.", formatter_class=FORMATTER)
    add.add_argument("--model", type=Path, required=True, help="artifact (vae.ts)")
    add.add_argument("--name", required=True, help="the direction's name, e.g. thick-strokes")
    add.add_argument("--positive", type=Path, required=True, help="folder of images with the attribute")
    add.add_argument("--negative", type=Path, required=True, help="folder of images without it")
    add.add_argument("--description", default="", help="one line (default: '<positive> minus <negative>')")
    add.add_argument("--out", type=Path, default=None, help="write here instead of rewriting --model in place")
    add.add_argument("--replace", action="store_true", help="overwrite a direction of the same name")
    show = sub.add_parser("list", help="the artifact's directions (name, kind, n_pos, n_neg, norm, AUROC)",
                          description="One JSON line per direction of the artifact, without its vector.",
                          formatter_class=FORMATTER)
    show.add_argument("--model", type=Path, required=True, help="artifact (vae.ts)")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.command == "add":
        direction = add_direction(args.model, args.name, args.positive, args.negative,
                                  description=args.description, out=args.out, replace=args.replace)
        print(json.dumps(direction.to_dict(vector=False)))
        return 0
    for direction in read_metadata(args.model).directions:
        print(json.dumps(direction.to_dict(vector=False)))
    return 0
