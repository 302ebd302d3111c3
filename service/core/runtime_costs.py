"""What the service's runtime adds to the model alone, per call, on one device: ``ModelRuntime.encode`` (numpy
in, padding to the probed call size, device copy, numpy out) against the artifact's ``encode`` on a tensor
already on the device, with the copy back. No HTTP, no batcher. Medians of many calls, after warm-up.

``python -m service.core.runtime_costs --model vae.ts --device cuda``; prints one table. (A maintainer's
tool, beside what it measures: the benchmark itself only sees the service from outside.)
"""

import argparse
from pathlib import Path

import numpy as np
import torch
from torch.utils.benchmark import Timer

from service.core.runtime import ModelRuntime


def median_ms(fn, calls: int) -> float:
    """Median of ``calls`` timed calls after a warm one (torch's Timer waits for CUDA work before reading the
    clock)."""
    fn()
    return 1000.0 * Timer("fn()", globals={"fn": fn}).timeit(calls).median


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    runtime = ModelRuntime(args.model, device=args.device)
    warm_s = runtime.warm_up()
    module = runtime.module
    c, h, w = runtime.info.channels, runtime.info.height, runtime.info.width
    print(f"device {args.device}; call sizes {runtime.call_sizes}; rows exact from {runtime.exact_from}; "
          f"warm-up {warm_s:.2f} s")
    print("| rows | model alone (ms) | runtime.encode (ms) | added (ms) |")
    print("|---:|---:|---:|---:|")
    rng = np.random.default_rng(0)
    with torch.inference_mode():
        for rows in (1, 4, 64, 256):
            images = rng.integers(0, 256, size=(rows, c, h, w), dtype=np.uint8)
            x = torch.from_numpy(images).to(args.device).float().div_(255.0)  # the contract's input scaling
            alone = median_ms(lambda: [t.cpu() for t in module.encode(x)], args.calls)
            served = median_ms(lambda: runtime.encode(images), args.calls)
            print(f"| {rows} | {alone:.3f} | {served:.3f} | {served - alone:+.3f} |")


if __name__ == "__main__":
    main()
