"""Latent directions for attribute edits: computed when training writes the artifact, or added to one later.

    python -m training directions add --model runs/digits/vae.ts --name thick --positive thick/ --negative thin/
    python -m training directions list --model runs/digits/vae.ts

At training time (``directions_section``), from the posterior means of the train split as served (8-bit
images, x = u / 255, the serving module's ``encode``), each checked on the test split:

- ``class:<label>`` for every label when the data has at least two: the mean of that class minus the mean of
  the other labelled images; AUROC of <mu, v> separating that class from the others in the test split;
- ``pixel:<statistic>`` for any data (``pixel_statistics``): the mean of the top quartile of the statistic
  minus that of the bottom quartile; AUROC separating the test split's top quartile from its bottom quartile.

``add`` builds a ``custom`` direction from two folders of example images with the artifact's own TorchScript
``encode`` and rewrites only the metadata (the weights, and so ``weights_sha256``, stay as they are), as
recalibration does. Its AUROC is cross-fitted over the examples (``vae_artifact.directions``), the same
computation as the service's ``POST /directions/compute``, which gives the same vector for the same images.
The math is the contract's (``vae_artifact.directions``); edits are z' = mu + strength * vector.
"""

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from vae_artifact import directions as contract
from vae_artifact.directions import Direction, DirectionsSection
from vae_artifact.io import load_artifact, save_artifact
from vae_artifact.metadata import ImageShape

log = logging.getLogger(__name__)

EncodeFn = Callable[[torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]
ENCODE_ROWS = 1024  # images per encode call: bounds memory on any image size
INK = 64  # a pixel is ink above this 8-bit value (a quarter of full scale) for pixel:size
RESERVED = ("class:", "pixel:")  # prefixes of the directions training computes itself
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})

# The pixel statistics behind the pixel:* directions, by image kind, with their one-line descriptions.
GRAY_STATISTICS = {
    "ink": "mean pixel intensity (more ink)",
    "size": f"area of the ink's bounding box (pixels above {INK}/255), as a fraction of the image",
    "slant": "shear of the ink from its image moments, -mu11 / mu02 (x right, y down): leaning right",
}
RGB_STATISTICS = {
    "brightness": "mean luma (ITU-R 601)",
    "contrast": "standard deviation of luma",
    "saturation": "mean HSV saturation, (max - min) / max of R, G, B",
}


def pixel_statistics(images: np.ndarray) -> Dict[str, np.ndarray]:
    """uint8 (N, C, H, W) -> {statistic: (N,) float64}: GRAY_STATISTICS for one channel, RGB_STATISTICS for three."""
    x = images.astype(np.float64) / 255.0
    n, c, h, w = x.shape
    if c == 3:
        luma = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
        high, low = x.max(axis=1), x.min(axis=1)
        saturation = np.divide(high - low, high, out=np.zeros_like(high), where=high > 0)
        return {"brightness": luma.mean(axis=(1, 2)), "contrast": luma.std(axis=(1, 2)),
                "saturation": saturation.mean(axis=(1, 2))}
    gray = x[:, 0]
    ink = images[:, 0] > INK
    rows, cols = ink.any(axis=2), ink.any(axis=1)  # (N, H), (N, W): does the row / column hold ink
    height = np.where(rows.any(axis=1), h - rows[:, ::-1].argmax(axis=1) - rows.argmax(axis=1), 0)
    width = np.where(cols.any(axis=1), w - cols[:, ::-1].argmax(axis=1) - cols.argmax(axis=1), 0)
    # Slant from second central moments of the intensity: the shear that would make the ink upright.
    mass = gray.sum(axis=(1, 2))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    safe = np.where(mass > 0, mass, 1.0)
    cy, cx = (gray * yy).sum(axis=(1, 2)) / safe, (gray * xx).sum(axis=(1, 2)) / safe
    dy, dx = yy[None] - cy[:, None, None], xx[None] - cx[:, None, None]
    mu11, mu02 = (gray * dx * dy).sum(axis=(1, 2)), (gray * dy * dy).sum(axis=(1, 2))
    slant = np.divide(-mu11, mu02, out=np.zeros(n), where=mu02 > 1e-12)
    return {"ink": gray.mean(axis=(1, 2)), "size": height * width / float(h * w), "slant": slant}


def quartiles(values: np.ndarray) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """(top, bottom) boolean masks: values at or above the 75th percentile, at or below the 25th. None when
    the two quartiles meet (a statistic constant over half the images separates nothing)."""
    low, high = np.quantile(values, [0.25, 0.75])
    return None if not high > low else (values >= high, values <= low)


@torch.inference_mode()
def posterior_means(encode: EncodeFn, images: np.ndarray, device: torch.device = torch.device("cpu")) -> np.ndarray:
    """uint8 (N, C, H, W) -> posterior means (N, D) float64, through ``encode`` as the service calls it."""
    parts = [encode(torch.from_numpy(images[start:start + ENCODE_ROWS]).to(device).float().div_(255.0))[0]
             .double().cpu().numpy() for start in range(0, len(images), ENCODE_ROWS)]
    return np.concatenate(parts) if parts else np.zeros((0, 0))


def directions_section(encode: EncodeFn, train: Tuple[np.ndarray, np.ndarray], test: Tuple[np.ndarray, np.ndarray],
                       device: torch.device = torch.device("cpu")) -> Dict:
    """The artifact's ``directions`` section from the (uint8 images, labels) of the train and test splits,
    8-bit as served; labels are -1 where the data has none."""
    (train_x, train_y), (test_x, test_y) = train, test
    mu_train, mu_test = posterior_means(encode, train_x, device), posterior_means(encode, test_x, device)
    items: List[Direction] = []
    labels = sorted(int(v) for v in np.unique(train_y[train_y >= 0]))
    for label in labels if len(labels) >= 2 else []:
        pos, neg = train_y == label, (train_y >= 0) & (train_y != label)
        vector = contract.direction(mu_train[pos], mu_train[neg])
        held_pos, held_neg = test_y == label, (test_y >= 0) & (test_y != label)
        items.append(_direction(f"class:{label}", "class", f"label {label} against the other labels", vector,
                                pos.sum(), neg.sum(), mu_test, held_pos, held_neg))
    described = RGB_STATISTICS if train_x.shape[1] == 3 else GRAY_STATISTICS
    stats_train, stats_test = pixel_statistics(train_x), pixel_statistics(test_x)
    for name, description in described.items():
        groups = quartiles(stats_train[name])
        if groups is None:
            log.warning("pixel:%s is constant over half the train split; no direction", name)
            continue
        top, bottom = groups
        held = quartiles(stats_test[name]) if len(test_x) else None
        items.append(_direction(f"pixel:{name}", "pixel", f"{description}: top quartile minus bottom quartile",
                                contract.direction(mu_train[top], mu_train[bottom]), top.sum(), bottom.sum(),
                                mu_test, *(held or (None, None))))
    section = DirectionsSection({d.name: d for d in items})
    log.info("directions: %s", {d.name: d.auroc for d in section})
    return section.to_dict()


def _direction(name: str, kind: str, description: str, vector: np.ndarray, n_pos: int, n_neg: int,
               mu_test: np.ndarray, held_pos: Optional[np.ndarray], held_neg: Optional[np.ndarray]) -> Direction:
    checked = held_pos is not None and held_pos.any() and held_neg.any()
    auroc = contract.projection_auroc(vector, mu_test[held_pos], mu_test[held_neg]) if checked else None
    return Direction(name=name, kind=kind, description=description, vector=tuple(float(v) for v in vector),
                     n_pos=int(n_pos), n_neg=int(n_neg), auroc=auroc)


def read_folder(folder: Path, image: ImageShape) -> np.ndarray:
    """Every image file directly in ``folder`` (sorted by name) -> uint8 (N, C, H, W) in the model's mode and
    size, converted as the service converts uploads: alpha onto black, then L or RGB, bilinear resize."""
    if not Path(folder).is_dir():
        raise SystemExit(f"{folder} is not a folder of images")
    paths = sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                   and not p.name.startswith("."))
    if not paths:
        raise SystemExit(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}")
    mode = "L" if image.channels == 1 else "RGB"
    out = np.empty((len(paths), image.channels, image.height, image.width), np.uint8)
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as source:
                picture = source
                if source.mode in ("RGBA", "LA", "PA") or "transparency" in source.info:
                    picture = source.convert("RGBA")
                    black = Image.new("RGB", picture.size)
                    black.paste(picture, mask=picture.getchannel("A"))
                    picture = black
                picture = picture.convert(mode)
                if picture.size != (image.width, image.height):
                    picture = picture.resize((image.width, image.height), Image.Resampling.BILINEAR)
                pixels = np.asarray(picture, np.uint8)
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise SystemExit(f"cannot read image {path}: {exc}") from exc
        out[i] = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
    return out


def add_direction(model: Path, name: str, positive: Path, negative: Path, *, description: str = "",
                  out: Optional[Path] = None, replace: bool = False) -> Direction:
    """Add a ``custom`` direction (from two folders of examples) to an artifact's metadata and write it again
    (``out``, default in place); the module and its weights are written back unchanged."""
    if name.startswith(RESERVED):
        raise SystemExit(f"direction names starting with {' or '.join(RESERVED)} are reserved for the ones "
                         "training computes; choose another name")
    if not contract.NAME.match(name):
        raise SystemExit(f"direction name {name!r} must be 1-64 characters of letters, digits and _.:+-")
    module, meta = load_artifact(model)
    mu = {side: posterior_means(module.encode, read_folder(folder, meta.image))
          for side, folder in (("positive", positive), ("negative", negative))}
    direction = contract.from_examples(name, "custom", description or f"{positive.name} minus {negative.name}",
                                       mu["positive"], mu["negative"])
    try:
        section = meta.directions.with_direction(direction, replace=replace)
    except ValueError as exc:
        raise SystemExit(f"{model}: {exc} (pass --replace to overwrite it)") from exc
    target = Path(out or model)
    save_artifact(module, target, dict(meta.to_dict(), directions=section.to_dict()))
    load_artifact(target)  # fails loudly if the rewritten artifact does not read back
    return direction


if __name__ == "__main__":
    from training.aliases import forward

    forward("training.directions", ["directions"], sys.argv[1:])
