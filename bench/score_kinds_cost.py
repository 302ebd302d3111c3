"""What each anomaly score kind costs per image beyond the model, in-process, side by side: the one ``score``
call every kind shares (the runtime at the calibration's K), the kind's compressor, the latent bank's
nearest-neighbour distance (``fisher-<c>-nn`` kinds: the artifact's ``latent_neighbour_distance``, one more
encoder pass and the distances), and the kind's own formula (``ScoreKind.scores``) and response rows
(``scoring.score_rows``). Issue #15 asks that a new kind cost no more
than 2x the previous default (``nll-minus-bz2``) per request.

``python -m bench.score_kinds_cost --model vae.ts --images idx:DIR`` (a 1x28x28 model); prints one table
(medians of rounds).
"""

import argparse
from pathlib import Path

import numpy as np

from bench import common
from bench.workloads import load_images
from service.core import scoring
from service.core.runtime import ModelRuntime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--images", default="digits", help="digits | idx:DIR (as python -m bench)")
    parser.add_argument("--rows", type=int, default=16, help="images per request")
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    runtime = ModelRuntime(args.model, device="cpu")
    runtime.warm_up(rounds=1)
    kinds = scoring.ScoreKinds.from_metadata(runtime.metadata, neighbours=runtime.has_neighbours)
    k = runtime.info.score_k
    images = np.ascontiguousarray(load_images(args.images, args.rows)[:, None])  # (N, 1, 28, 28)
    if images.shape[1:] != (runtime.info.channels, runtime.info.height, runtime.info.width):
        parser.error(f"the model takes {runtime.info.channels}x{runtime.info.height}x{runtime.info.width} images; "
                     "--images gives 1x28x28")
    outputs = runtime.score(images, k)
    model_ms = common.median_ms(lambda: runtime.score(images, k), args.rounds)
    print(f"{args.rows} images per request, K={k}; the model's score call: {model_ms:.2f} ms "
          f"({model_ms / args.rows:.3f} ms per image)")
    neighbours_ms = common.median_ms(lambda: runtime.neighbours(images), args.rounds) if runtime.has_neighbours else 0
    print("| kind | compressor (ms) | latent bank (ms) | formula and rows (ms) | request total (ms) | per image (ms) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, kind in kinds.kinds.items():
        bits_ms = common.median_ms(lambda: kinds.complexity_bits(kind, images), args.rounds)
        bits = kinds.complexity_bits(kind, images)
        bank_ms = neighbours_ms if kind.needs_neighbours else 0.0
        out = {**outputs, **runtime.neighbours(images)} if kind.needs_neighbours else outputs
        rows_ms = common.median_ms(lambda: scoring.score_rows(out, num_dims=runtime.info.num_dims,
                                                              calibration=kind.calibration, alpha=0.01,
                                                              tail="upper", k=k, complexity_bits=bits, kind=kind),
                                   args.rounds)
        total = model_ms + bits_ms + bank_ms + rows_ms
        print(f"| {name} | {bits_ms:.3f} | {bank_ms:.3f} | {rows_ms:.3f} | {total:.2f} | {total / args.rows:.3f} |")


if __name__ == "__main__":
    main()
