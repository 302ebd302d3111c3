"""Data sources for training: load images as uint8 arrays and split them into train / val / calib / test.

A spec string picks the source (``digits``, ``idx:DIR``, ``folder:DIR``, ``npz:FILE``); every source ends
up as uint8 ``(N, C, H, W)`` images with a number of discrete pixel ``levels`` and int64 labels (-1 where the
source has none). Pixels stay integers until :func:`to_float`, so the likelihood sees the data's real
quantisation (17 levels for sklearn digits, 256 for 8-bit images).
"""

from __future__ import annotations

import gzip
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler, TensorDataset

logger = logging.getLogger(__name__)

SPEC_FORMS = ("digits", "idx:DIR", "folder:DIR", "npz:FILE")
_IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"})
_GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "F"})
_IDX_UBYTE = 0x08  # the IDX dtype code for unsigned bytes; MNIST and Fashion-MNIST use nothing else
SPLIT_SEED = 0  # fixed, not --seed: runs with different seeds are evaluated and calibrated on the same images
BINARIZE_SEED = 1234  # the one fixed draw that binarises the val / test splits (+0, +2; +1 was calib's once)
# Default split fractions: val and calib of the pool (the non-test images), test of all images when the source
# has no test split of its own.
VAL_FRACTION, CALIB_FRACTION, TEST_FRACTION = 0.1, 0.1, 0.2


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # uint8, (N, C, H, W), values in [0, levels - 1]
    labels: np.ndarray  # int64, (N,), -1 where the source has no labels

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {self.images.dtype} {self.images.shape}")
        if self.labels.dtype != np.int64 or self.labels.shape != self.images.shape[:1]:
            raise ValueError(f"labels must be int64 ({len(self.images)},), got {self.labels.dtype} {self.labels.shape}")

    def __len__(self) -> int:
        return len(self.images)


@dataclass(frozen=True)
class Dataset:
    name: str  # the spec as given
    levels: int  # discrete pixel levels: 256 for 8-bit data, 17 for raw sklearn digits
    train: Split
    val: Split  # early stopping
    calib: Split  # held-out normal data for anomaly-score calibration; never trained on
    test: Split

    def __post_init__(self) -> None:
        if self.levels < 2:
            raise ValueError(f"levels must be >= 2, got {self.levels}")
        for split in (self.val, self.calib, self.test):
            if split.images.shape[1:] != self.train.images.shape[1:]:
                raise ValueError(f"split shape {split.images.shape[1:]} != train {self.train.images.shape[1:]}")

    @property
    def channels(self) -> int:
        return self.train.images.shape[1]

    @property
    def height(self) -> int:
        return self.train.images.shape[2]

    @property
    def width(self) -> int:
        return self.train.images.shape[3]


def load_dataset(spec: str, *, image_size: int | None = None, channels: int | None = None,
                 classes: Sequence[int] | None = None, val_fraction: float = VAL_FRACTION,
                 calib_fraction: float = CALIB_FRACTION, test_fraction: float = TEST_FRACTION,
                 seed: int = 0) -> Dataset:
    """Load the source named by ``spec`` and split it deterministically in ``seed``.

    A source's own test split (IDX t10k files, npz ``x_test``) is kept; otherwise ``test_fraction`` of all
    images becomes the test split. ``val_fraction`` and ``calib_fraction`` are fractions of what remains.
    Every split gets at least one image. ``classes`` keeps only those labels (unchanged, not re-indexed) in
    every split. ``channels`` (1 or 3) and ``image_size`` (square side) convert any source.
    """
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    if image_size is not None and image_size < 1:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
    for what, fraction in (("val_fraction", val_fraction), ("calib_fraction", calib_fraction),
                           ("test_fraction", test_fraction)):
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"{what} must be in [0, 1), got {fraction!r}")
    if val_fraction + calib_fraction >= 1.0:
        raise ValueError(f"val_fraction + calib_fraction must be < 1, got {val_fraction + calib_fraction}")

    kind, _, arg = spec.partition(":")
    if spec == "digits":
        levels, pool, test = _load_digits(image_size)
    elif kind in ("idx", "folder", "npz") and arg:
        path = Path(arg).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"{kind} source not found: {path}")
        if kind == "idx":
            pool, test = _load_idx(path)
        elif kind == "folder":
            pool, test = _load_folder(path, image_size, channels)
        else:
            pool, test = _load_npz(path)
        levels = 256
    else:
        raise ValueError(f"unknown data spec {spec!r}; expected one of: {', '.join(SPEC_FORMS)}")

    if classes is not None:
        pool = _keep_classes(pool, classes, spec)
        test = _keep_classes(test, classes, spec) if test is not None else None
    pool = _convert(pool, channels, image_size)
    test = _convert(test, channels, image_size) if test is not None else None

    rng = np.random.default_rng(seed)
    if test is None:
        test_idx, pool_idx = _carve(len(pool), [test_fraction], rng, spec)
        pool, test = _take(pool, pool_idx), _take(pool, test_idx)
    val_idx, calib_idx, train_idx = _carve(len(pool), [val_fraction, calib_fraction], rng, spec)
    dataset = Dataset(name=spec, levels=levels, train=_take(pool, train_idx), val=_take(pool, val_idx),
                      calib=_take(pool, calib_idx), test=test)
    logger.info("loaded %s: %dx%dx%d, %d levels, train/val/calib/test = %d/%d/%d/%d", spec, dataset.channels,
                dataset.height, dataset.width, levels, len(dataset.train), len(dataset.val), len(dataset.calib),
                len(dataset.test))
    return dataset


def to_float(images: np.ndarray | torch.Tensor, levels: int) -> torch.Tensor:
    """uint8 levels -> float32 tensor in [0, 1]: x = v / (levels - 1)."""
    if levels < 2:
        raise ValueError(f"levels must be >= 2, got {levels}")
    # Out of place on purpose: `.to` returns the input itself when it is already float32.
    return torch.as_tensor(images).to(torch.float32) / (levels - 1)


def to_8bit(images: np.ndarray, levels: int) -> np.ndarray:
    """Images stored at ``levels`` values (0 .. levels-1) -> the 8-bit images a client would send."""
    if levels == 256:
        return images.astype(np.uint8, copy=False)
    return np.round(images.astype(np.float64) * (255.0 / (levels - 1))).astype(np.uint8)


def binarize_once(split: Split, levels: int, seed: int) -> Split:
    """Evaluation splits are binarised once, with a fixed seed, so every epoch sees the same {0, 1} images."""
    probs = to_float(split.images, levels)
    bits = torch.bernoulli(probs, generator=torch.Generator().manual_seed(seed))
    return Split(bits.to(torch.uint8).numpy(), split.labels)


def held_out_splits(dataset: Dataset, binarize: bool) -> tuple[Split, Split, int]:
    """(val, test, levels) as a model trained on ``dataset`` is evaluated: the splits themselves, or for a
    binarised model each binarised once with its fixed seed, at 2 levels (the literature's dynamic
    binarisation). Not the calib split: anomaly scores are calibrated on what the service gets, 8-bit images,
    which a binarised model thresholds itself (``training.calibration.calibration_images``)."""
    if not binarize:
        return dataset.val, dataset.test, dataset.levels
    return (binarize_once(dataset.val, dataset.levels, BINARIZE_SEED),
            binarize_once(dataset.test, dataset.levels, BINARIZE_SEED + 2), 2)


def make_loader(split: Split, levels: int, *, batch_size: int, shuffle: bool, seed: int,
                drop_last: bool = False) -> DataLoader:
    """Batches ``(x, y)`` of float32 ``(B, C, H, W)`` in [0, 1] and int64 labels; the order depends only on
    ``seed`` (and on how many epochs were already drawn from this loader)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    data = TensorDataset(torch.from_numpy(split.images), torch.from_numpy(split.labels))
    order = RandomSampler(data, generator=torch.Generator().manual_seed(seed)) if shuffle else SequentialSampler(data)
    # The sampler yields whole index lists, so each batch is one tensor gather (not B single-item fetches), and
    # the uint8 -> float conversion happens per batch: the split stays uint8 in memory (4x smaller).
    return DataLoader(data, sampler=BatchSampler(order, batch_size, drop_last), batch_size=None,
                      collate_fn=partial(_batch_to_float, levels=levels), num_workers=0)


def _batch_to_float(batch: list[torch.Tensor], levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = batch
    return to_float(images, levels), labels


def _load_digits(image_size: int | None) -> tuple[int, Split, None]:
    from sklearn.datasets import load_digits  # training-only dependency; keep it out of import time

    digits = load_digits()
    images, labels = digits.images.astype(np.uint8)[:, None], digits.target.astype(np.int64)  # (N, 1, 8, 8)
    if image_size is None or image_size == 8:
        return 17, Split(images, labels), None  # raw values 0..16: 17 levels, no rescaling
    images = np.rint(images.astype(np.float64) * 255 / 16).astype(np.uint8)
    return 256, Split(_resize(images, image_size), labels), None


def _load_idx(directory: Path) -> tuple[Split, Split]:
    splits = []
    for prefix in ("train", "t10k"):
        images = _read_idx(_idx_file(directory, f"{prefix}-images-idx3-ubyte"), ndim=3)
        labels = _read_idx(_idx_file(directory, f"{prefix}-labels-idx1-ubyte"), ndim=1)
        if len(images) != len(labels):
            raise ValueError(f"{directory}: {prefix} has {len(images)} images but {len(labels)} labels")
        splits.append(Split(images[:, None], labels.astype(np.int64)))
    return splits[0], splits[1]


def _idx_file(directory: Path, name: str) -> Path:
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"IDX file not found: {directory / name}[.gz]")


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """Parse one IDX file: 2 zero bytes, a dtype code, the number of dims, then big-endian uint32 dims."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError) as exc:  # a truncated or corrupt .gz
        raise ValueError(f"cannot read IDX file {path}: {exc}") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[3] != ndim:
        raise ValueError(f"{path} is not an IDX file with {ndim} dims (magic {raw[:4].hex() or 'missing'})")
    if raw[2] != _IDX_UBYTE:
        raise ValueError(f"{path}: unsupported IDX dtype code {raw[2]:#04x}; only 0x08 (uint8) is supported")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    if len(raw) - header != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} = {int(np.prod(dims))} bytes of data, "
                         f"file has {len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()  # copy: writable, owns memory


def _load_folder(root: Path, image_size: int | None, channels: int | None) -> tuple[Split, None]:
    if not root.is_dir():
        raise ValueError(f"folder source {root} is not a directory")
    paths = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES
                   and not p.name.startswith("."))  # skip macOS "._x.png" resource forks
    if not paths:
        raise ValueError(f"no images ({', '.join(sorted(_IMAGE_SUFFIXES))}) found under {root}")
    headers = [_peek_image(p) for p in paths]  # [(mode, (w, h))]; cheap, nothing decoded yet
    if channels is None:
        channels = 1 if all(mode in _GRAY_MODES for mode, _ in headers) else 3
    if image_size is not None:
        size = (image_size, image_size)
    else:
        size = headers[0][1]
        for path, (_, other) in zip(paths, headers):
            if other != size:
                raise ValueError(f"{path} is {other[0]}x{other[1]} but {paths[0]} is {size[0]}x{size[1]}; "
                                 "pass --image-size to resize all images to one size")
    mode = "L" if channels == 1 else "RGB"
    images = np.stack([_read_image(p, mode, size) for p in paths])  # (N, H, W) or (N, H, W, 3)
    images = images[:, None] if channels == 1 else images.transpose(0, 3, 1, 2)  # -> (N, C, H, W)

    parts = [p.relative_to(root).parts for p in paths]
    if all(len(part) == 2 for part in parts):  # root/<class>/<image>: labelled by sorted class folder
        names = sorted({part[0] for part in parts})
        logger.info("%s: classes %s", root, dict(enumerate(names)))
        labels = np.array([names.index(part[0]) for part in parts], dtype=np.int64)
    else:
        labels = np.full(len(paths), -1, dtype=np.int64)
    return Split(np.ascontiguousarray(images), labels), None


@contextmanager
def _open_image(path: Path) -> Iterator[Image.Image]:
    """Open an image file, turning Pillow's many failure types into one ValueError naming the file."""
    try:
        with Image.open(path) as image:
            yield image
    except (OSError, Image.DecompressionBombError) as exc:
        raise ValueError(f"cannot read image {path}: {exc}") from exc


def _peek_image(path: Path) -> tuple[str, tuple[int, int]]:
    """Mode and (width, height) from the header alone, without decoding the pixels."""
    with _open_image(path) as image:
        return image.mode, image.size


def _read_image(path: Path, mode: str, size: tuple[int, int]) -> np.ndarray:
    with _open_image(path) as image:
        image = image.convert(mode)
        if image.size != size:
            image = image.resize(size, Image.Resampling.BILINEAR)
        return np.asarray(image, dtype=np.uint8)


def _load_npz(path: Path) -> tuple[Split, Split | None]:
    with np.load(path, allow_pickle=False) as archive:  # no pickles: an npz must not be able to run code
        arrays = {key: archive[key] for key in archive.files}
    if "x_train" in arrays:
        keys = [("x_train", "y_train"), ("x_test", "y_test")]
    elif "images" in arrays:
        keys = [("images", "labels")]
    else:
        raise ValueError(f"{path}: expected keys x_train (+ y_train, x_test, y_test) or images (+ labels), "
                         f"found {sorted(arrays)}")
    splits = [_npz_split(path, arrays, x_key, y_key) for x_key, y_key in keys if x_key in arrays]
    return splits[0], (splits[1] if len(splits) > 1 else None)


def _npz_split(path: Path, arrays: dict[str, np.ndarray], x_key: str, y_key: str) -> Split:
    x = arrays[x_key]
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.transpose(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W); ambiguous shapes are read as NCHW
    elif not (x.ndim == 4 and x.shape[1] in (1, 3)):
        raise ValueError(f"{path}: {x_key} has shape {x.shape}; expected (N,H,W), (N,H,W,C) or (N,C,H,W), C in 1, 3")
    if np.issubdtype(x.dtype, np.floating):
        if not (np.isfinite(x).all() and x.min(initial=0) >= 0 and x.max(initial=0) <= 1):
            raise ValueError(f"{path}: float {x_key} must hold finite values in [0, 1]")
        x = np.rint(x * 255)
    elif not (np.issubdtype(x.dtype, np.integer) and x.min(initial=0) >= 0 and x.max(initial=0) <= 255):
        raise ValueError(f"{path}: {x_key} must be uint8 0..255 or float in [0, 1], got {x.dtype}")
    if y_key in arrays:
        y = arrays[y_key].reshape(-1)
        if len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"{path}: {y_key} must be {len(x)} integer labels, got {y.dtype} {arrays[y_key].shape}")
    else:
        y = np.full(len(x), -1)
    return Split(np.ascontiguousarray(x, dtype=np.uint8), y.astype(np.int64))


def _keep_classes(split: Split, classes: Sequence[int], spec: str) -> Split:
    if (split.labels < 0).all():
        raise ValueError(f"{spec} has no labels, so classes={list(classes)} cannot select any")
    keep = np.isin(split.labels, np.asarray(classes, dtype=np.int64))
    if not keep.any():
        raise ValueError(f"{spec}: no images with labels {list(classes)}; labels present: "
                         f"{sorted(set(split.labels.tolist()))}")
    return _take(split, np.flatnonzero(keep))


def _convert(split: Split, channels: int | None, image_size: int | None) -> Split:
    images = split.images
    if channels == 1 and images.shape[1] == 3:
        # ITU-R 601-2 luma with Pillow's fixed-point rounding, so this matches Image.convert("L") exactly.
        r, g, b = (images[:, i].astype(np.uint32) for i in range(3))
        images = ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)[:, None]
    elif channels == 3 and images.shape[1] == 1:
        images = np.repeat(images, 3, axis=1)
    if image_size is not None and images.shape[2:] != (image_size, image_size):
        images = _resize(images, image_size)
    return Split(images, split.labels) if images is not split.images else split


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of 8-bit (N, C, H, W) images with Pillow, one image at a time."""
    pictures = images.transpose(0, 2, 3, 1)  # (N, H, W, C): Pillow's layout
    if images.shape[1] == 1:
        pictures = pictures[..., 0]  # (N, H, W): Pillow reads 2-D uint8 as mode "L"
    resized = np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(picture))
                                   .resize((size, size), Image.Resampling.BILINEAR)) for picture in pictures])
    return resized[:, None] if images.shape[1] == 1 else np.ascontiguousarray(resized.transpose(0, 3, 1, 2))


def _carve(n: int, fractions: Sequence[float], rng: np.random.Generator, spec: str) -> list[np.ndarray]:
    """Split ``range(n)`` at random into one part per fraction (each at least 1) plus the rest (at least 1)."""
    sizes = [max(1, round(f * n)) for f in fractions]
    if n - sum(sizes) < 1:
        raise ValueError(f"{spec}: {n} images are too few to split into {len(sizes) + 1} non-empty parts")
    bounds = np.cumsum(sizes)
    # Sorted within each part, so a split keeps the source's order and depends only on which indices it holds.
    return [np.sort(part) for part in np.split(rng.permutation(n), bounds)]


def _take(split: Split, index: np.ndarray) -> Split:
    return Split(split.images[index], split.labels[index])
