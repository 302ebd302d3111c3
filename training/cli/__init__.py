"""``python -m training`` (``vae-train``): one command line, a verb per job; ``train`` is the default.

    python -m training [train] --data digits --out runs/digits/vae.ts    train a model into one artifact
    python -m training evaluate --model M                                 its test ELBO and IW-NLL, at any K
    python -m training ood evaluate|protocols|calibrate|sweep-k ...       anomaly scores and their calibration
    python -m training directions add|list --model M ...                  latent directions for edits
    python -m training speed full lean ...                                training images/s of model layouts

Each verb has its own ``--help``. The library never imports this package: it parses, calls the library, prints.
"""

import importlib
import sys
from typing import Optional, Sequence

VERBS = {  # verb -> (module of this package, one line)
    "train": ("train", "train a VAE and export it as one TorchScript artifact with a report (the default)"),
    "evaluate": ("evaluate", "an artifact's test ELBO and importance-weighted NLL on its data's test split"),
    "ood": ("ood", "score kinds against out-of-distribution images; protocols; calibration; the choice of K"),
    "directions": ("directions", "add or list an artifact's latent directions"),
    "speed": ("speed", "training images/s of model layouts, in alternating rounds"),
}


def usage() -> str:
    width = max(map(len, VERBS))
    lines = [__doc__.split("\n\n")[0].replace("``", ""), "", "usage: python -m training [VERB] [options]", "", "verbs:"]
    lines += [f"  {verb:{width}s}  {line}" for verb, (_, line) in VERBS.items()]
    lines += ["", "python -m training VERB --help describes a verb's options; with no verb, the options are "
              "train's."]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(usage())
        return 0
    verb, rest = (argv[0], argv[1:]) if argv[:1] and argv[0] in VERBS else ("train", argv)
    return importlib.import_module(f"training.cli.{VERBS[verb][0]}").main(rest)
