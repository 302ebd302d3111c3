"""What each anomaly score kind costs per image, in-process, side by side: the one ``score`` call every kind
shares (the artifact's, at the calibration's K), the kind's compressor, the latent statistics it needs (each one
more encoder pass: ``latent_neighbour_distance`` and its distances for the ``fisher-<c>-nn`` kinds,
``latent_log_density`` and its mixture for the ``density-<c>`` kinds), and the kind's own formula and response
rows.

``python -m bench.score_kinds_cost --model vae.ts --images idx:DIR`` (any model: the images are brought to its
size); prints one table (medians of rounds) and each kind's cost per image relative to the artifact's default
kind and to ``--versus``.
"""

import argparse
from pathlib import Path

import numpy as np
import torch

from bench import common
from bench.workloads import load_images, png


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--images", default="digits", help="digits | idx:DIR (as python -m bench)")
    parser.add_argument("--rows", type=int, default=16, help="images per request")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--versus", default="fisher-bz2-nn", help="also print each kind's cost relative to this one")
    args = parser.parse_args()
    metadata = common.read_metadata(args.model)
    shape = common.model_shape(metadata)
    module = common.load_model(args.model, args.threads)
    kinds = common.score_kinds(metadata)
    default = common.default_kind(metadata).name
    k = shape.score_k
    noise = common.score_noise(shape, k)
    # The images as the service would take them: in the model's mode and size.
    images = np.stack([common.decode_png(png(image), shape) for image in load_images(args.images, args.rows)])
    x = common.to_tensor(images)
    with torch.inference_mode():
        outputs = common.run_score(module, x, noise)
        model_ms = common.median_ms(lambda: common.run_score(module, x, noise), args.rounds)
        latent = frozenset().union(*(kind.latent_needs for kind in kinds.values()))
        outputs.update(common.run_score(module, x, noise, latent))
        # Each statistic's own method call, timed alone: a difference of two medians of the much longer score
        # call would carry that call's noise.
        latent_ms = {output: common.median_ms(lambda: common.run_latent(module, x, output), args.rounds)
                     for output in sorted(latent)}
    print(f"{args.rows} images per request, K={k}; the model's score call: {model_ms:.2f} ms "
          f"({model_ms / args.rows:.3f} ms per image)")
    print("| kind | compressor (ms) | latent statistics (ms) | formula and rows (ms) | request total (ms) "
          f"| per image (ms) | vs default | vs {args.versus} |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    totals, lines = {}, []
    for name, kind in kinds.items():
        bits_ms = common.median_ms(lambda: kind.bits(images), args.rounds)
        bits = kind.bits(images)
        rows_ms = common.median_ms(lambda: common.anomaly_body(outputs, shape, kind, k, bits), args.rounds)
        extra_ms = sum(latent_ms[output] for output in kind.latent_needs)
        totals[name] = model_ms + bits_ms + extra_ms + rows_ms
        lines.append((name, f"| {name} | {bits_ms:.3f} | {extra_ms:.3f} | {rows_ms:.3f} | {totals[name]:.2f} "
                            f"| {totals[name] / args.rows:.3f}"))
    for name, line in lines:
        versus = f"{totals[name] / totals[args.versus]:.3f}x" if args.versus in totals else "-"
        print(f"{line} | {totals[name] / totals[default]:.3f}x | {versus} |")
    print(f"default kind: {default}")


if __name__ == "__main__":
    main()
