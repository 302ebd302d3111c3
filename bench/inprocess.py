"""In-process model throughput, no HTTP: the artifact's kernels called directly at fixed batch sizes.

Run in its own process with the servers' torch thread count: ``python -m bench.inprocess --model vae.ts``.
Prints one JSON object: {kernel: {batch: {"images_per_s", "ms_per_call"}}}. Inputs are float tensors
ready for the model, so this is the model alone (no decoding, no conversion).
"""

import argparse
import json
import time
from pathlib import Path
from typing import Callable, Dict

import torch

from bench import common

ENCODE_BATCHES = (1, 4, 16, 64, 256)
SCORE_BATCHES = (1, 4, 16, 64)
DECODE_BATCHES = (1, 64)


def measure(fn: Callable[[], object], rows: int, seconds: float, warm: int = 3,
            sync: Callable[[], None] = lambda: None) -> Dict[str, float]:
    """``sync`` waits for queued device work (CUDA kernels run asynchronously): called before each clock read."""
    for _ in range(warm):  # TorchScript's profiling executor specialises on the first calls of a shape
        fn()
    sync()
    calls, started = 0, time.perf_counter()
    while calls < 5 or time.perf_counter() - started < seconds:
        fn()
        sync()
        calls += 1
    elapsed = time.perf_counter() - started
    return {"images_per_s": rows * calls / elapsed, "ms_per_call": 1000.0 * elapsed / calls}


def run(model: Path, threads: int, seconds: float, device: str = "cpu") -> Dict[str, Dict[int, Dict[str, float]]]:
    shape = common.model_shape(common.read_metadata(model))
    module = common.load_model(model, threads, device)
    noise = common.score_noise(shape, shape.score_k, device)
    results: Dict[str, Dict[int, Dict[str, float]]] = {"encode": {}, "score": {}, "decode": {}}
    gen = torch.Generator().manual_seed(0)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    with torch.inference_mode():
        for b in ENCODE_BATCHES:
            x = torch.rand((b, shape.channels, shape.height, shape.width), generator=gen).to(device)
            results["encode"][b] = measure(lambda: module.encode(x), b, seconds, sync=sync)
        for b in SCORE_BATCHES:  # run_score copies its outputs to the host: the time includes that
            x = torch.rand((b, shape.channels, shape.height, shape.width), generator=gen).to(device)
            results["score"][b] = measure(lambda: common.run_score(module, x, noise), b, seconds, sync=sync)
        for b in DECODE_BATCHES:
            z = torch.randn((b, shape.latent_dim), generator=gen).to(device)
            results["decode"][b] = measure(lambda: module.decode(z), b, seconds, sync=sync)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=1.0, help="per kernel and batch size")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    args = parser.parse_args()
    print(json.dumps(run(args.model, args.threads, args.seconds, args.device)))


if __name__ == "__main__":
    main()
