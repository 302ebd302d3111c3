"""The command lines that ``python -m training <verb>`` replaced still work: each says what replaced it and runs
that, in place of itself (a new process image, so nothing of the command line is imported here)."""

import os
import sys
from typing import Sequence


def forward(old: str, verb: Sequence[str], args: Sequence[str]) -> None:
    """Run ``python -m training VERB... ARGS...`` instead of ``python -m OLD ...``."""
    print(f"note: python -m {old} is now python -m training {' '.join(verb)}", file=sys.stderr, flush=True)
    os.execv(sys.executable, [sys.executable, "-m", "training", *verb, *args])
