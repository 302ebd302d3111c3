"""What each anomaly score kind costs per image, in-process, side by side: the one ``score`` call every kind
shares (the artifact's, at the calibration's K), the kind's compressor, the latent bank's nearest-neighbour
distance (``fisher-<c>-nn`` kinds: the artifact's ``latent_neighbour_distance``, one more encoder pass and the
distances), and the kind's own formula and response rows.

``python -m bench.score_kinds_cost --model vae.ts --images idx:DIR`` (a 1x28x28 model); prints one table
(medians of rounds) and each kind's cost per image relative to the artifact's default kind.
"""

import argparse
from pathlib import Path

import numpy as np
import torch

from bench import common
from bench.workloads import load_images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--images", default="digits", help="digits | idx:DIR (as python -m bench)")
    parser.add_argument("--rows", type=int, default=16, help="images per request")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    metadata = common.read_metadata(args.model)
    shape = common.model_shape(metadata)
    module = common.load_model(args.model, args.threads)
    kinds = common.score_kinds(metadata)
    default = common.default_kind(metadata).name
    k = shape.score_k
    noise = common.score_noise(shape, k)
    images = np.ascontiguousarray(load_images(args.images, args.rows)[:, None])  # (N, 1, 28, 28)
    if images.shape[1:] != (shape.channels, shape.height, shape.width):
        parser.error(f"the model takes {shape.channels}x{shape.height}x{shape.width} images; --images gives 1x28x28")
    x = common.to_tensor(images)
    with torch.inference_mode():
        outputs = common.run_score(module, x, noise)
        model_ms = common.median_ms(lambda: common.run_score(module, x, noise), args.rounds)
        neighbours = any(kind.needs_neighbours for kind in kinds.values())
        if neighbours:
            outputs["latent_nn"] = common.to_numpy(module.latent_neighbour_distance(x))
        bank_ms = common.median_ms(lambda: module.latent_neighbour_distance(x), args.rounds) if neighbours else 0.0
    print(f"{args.rows} images per request, K={k}; the model's score call: {model_ms:.2f} ms "
          f"({model_ms / args.rows:.3f} ms per image)")
    print("| kind | compressor (ms) | latent bank (ms) | formula and rows (ms) | request total (ms) | per image (ms) "
          "| vs default |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    totals = {}
    for name, kind in kinds.items():
        bits_ms = common.median_ms(lambda: kind.bits(images), args.rounds)
        bits = kind.bits(images)
        rows_ms = common.median_ms(lambda: common.anomaly_body(outputs, shape, kind, k, bits), args.rounds)
        totals[name] = model_ms + bits_ms + (bank_ms if kind.needs_neighbours else 0.0) + rows_ms
        print(f"| {name} | {bits_ms:.3f} | {bank_ms if kind.needs_neighbours else 0.0:.3f} | {rows_ms:.3f} "
              f"| {totals[name]:.2f} | {totals[name] / args.rows:.3f} | {totals[name] / totals.get(default, 1):.3f}x |")
    print(f"default kind: {default}")


if __name__ == "__main__":
    main()
