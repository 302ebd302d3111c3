"""Tests for training.data: every source, the splits, filtering/conversion options, the loader, the errors."""

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training.data import Dataset, Split, load_dataset, make_loader, to_float
from tests.helpers import datasets

SPLITS = ("train", "val", "calib", "test")


# --- fixtures ---------------------------------------------------------------------------------------------

def unique_images(n: int, size: int = 8, start: int = 0, seed: int = 0) -> np.ndarray:
    """(n, size, size) uint8 images whose first two pixels spell their id, so any image can be traced back."""
    images = np.random.default_rng(seed).integers(0, 256, (n, size, size), dtype=np.uint8)
    ids = np.arange(start, start + n)
    images[:, 0, 0], images[:, 0, 1] = ids // 256, ids % 256
    return images


def image_ids(split: Split) -> list[int]:
    return (split.images[:, 0, 0, 0].astype(int) * 256 + split.images[:, 0, 0, 1]).tolist()


def write_idx(path: Path, array: np.ndarray) -> None:
    payload = struct.pack(f">BBBB{array.ndim}I", 0, 0, 0x08, array.ndim, *array.shape) + array.tobytes()
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)


@pytest.fixture(params=["", ".gz"], ids=["plain", "gz"])
def idx_dir(tmp_path: Path, request: pytest.FixtureRequest) -> Path:
    """50 train + 10 test unique 8x8 images, label = id % 10."""
    for prefix, start, n in (("train", 0, 50), ("t10k", 50, 10)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte{request.param}", unique_images(n, start=start))
        labels = (np.arange(start, start + n) % 10).astype(np.uint8)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte{request.param}", labels)
    return tmp_path


@pytest.fixture
def class_folder(tmp_path: Path) -> Path:
    """cats/ (2 gray PNGs + 1 gray JPEG) and dogs/ (2 gray PNGs); pixel value = 100 * class + 10 * k + 20."""
    root = tmp_path / "pets"
    for label, name in enumerate(["cats", "dogs"]):  # sorted order is the label order
        (root / name).mkdir(parents=True)
        for k, suffix in enumerate([".png", ".png", ".jpg"][: 3 - label]):
            Image.fromarray(np.full((6, 6), 100 * label + 10 * k + 20, np.uint8)).save(root / name / f"{k}{suffix}")
    return root


# --- digits -----------------------------------------------------------------------------------------------

def test_digits_are_raw_17_levels_split_four_ways():
    data = load_dataset("digits")
    assert isinstance(data, Dataset) and data.name == "digits" and data.levels == 17
    assert (data.channels, data.height, data.width) == (1, 8, 8)
    assert sum(len(getattr(data, s).images) for s in SPLITS) == 1797
    assert len(data.test.images) == round(0.2 * 1797)
    for split in (getattr(data, s) for s in SPLITS):
        assert split.images.dtype == np.uint8 and split.labels.dtype == np.int64
        assert split.images.max() <= 16
    assert set(data.train.labels.tolist()) == set(range(10))
    assert data.train.images.max() == 16  # values kept, not rescaled to 0..255
    from sklearn.datasets import load_digits

    source = load_digits()
    labels_of: dict[bytes, set[int]] = {}
    for image, label in zip(source.images.astype(np.uint8), source.target):
        labels_of.setdefault(image.tobytes(), set()).add(int(label))
    for split in (getattr(data, s) for s in SPLITS):
        assert all(int(y) in labels_of[x[0].tobytes()] for x, y in zip(split.images, split.labels))


def test_digits_resized_become_8_bit():
    data = load_dataset("digits", image_size=16)
    assert data.levels == 256 and data.train.images.shape[1:] == (1, 16, 16)
    assert data.train.images.max() > 200


# --- idx --------------------------------------------------------------------------------------------------

def test_idx_keeps_its_test_split_and_splits_the_rest_disjointly(idx_dir: Path):
    data = load_dataset(f"idx:{idx_dir}")
    assert data.levels == 256 and data.train.images.shape[1:] == (1, 8, 8)
    assert sorted(image_ids(data.test)) == list(range(50, 60))
    pool = [image_ids(data.train), image_ids(data.val), image_ids(data.calib)]
    assert [len(ids) for ids in pool] == [40, 5, 5]
    assert sorted(sum(pool, [])) == list(range(50))  # every training image exactly once
    for split in (getattr(data, s) for s in SPLITS):
        assert split.labels.tolist() == [i % 10 for i in image_ids(split)]  # labels stay with their images


def test_splits_are_deterministic_in_seed(idx_dir: Path):
    first, again, other = (load_dataset(f"idx:{idx_dir}", seed=s) for s in (3, 3, 4))
    for name in SPLITS:
        np.testing.assert_array_equal(getattr(first, name).images, getattr(again, name).images)
    assert image_ids(first.val) != image_ids(other.val)


def test_classes_are_filtered_in_every_split(idx_dir: Path):
    data = load_dataset(f"idx:{idx_dir}", classes=[1, 3])
    for name in SPLITS:
        assert set(getattr(data, name).labels.tolist()) <= {1, 3}
    assert sorted(image_ids(data.test)) == [51, 53]
    assert sum(len(getattr(data, s).labels) for s in ("train", "val", "calib")) == 10


def test_idx_resize_matches_pillow_bilinear(idx_dir: Path):
    data = load_dataset(f"idx:{idx_dir}", image_size=5, channels=3)
    assert data.train.images.shape[1:] == (3, 5, 5)
    source = unique_images(10, start=50)[0]
    expected = np.asarray(Image.fromarray(source).resize((5, 5), Image.Resampling.BILINEAR))
    for channel in range(3):
        np.testing.assert_array_equal(data.test.images[0, channel], expected)


@pytest.mark.parametrize("damage, message", [
    (lambda raw: b"\x00\x00\x08\x02" + raw[4:], "not an IDX file"),  # wrong dims byte for an image file
    (lambda raw: b"\x01\x00\x08\x03" + raw[4:], "not an IDX file"),
    (lambda raw: raw[:4] + b"\x00\x00\x00\x33" + raw[8:], "header says"),  # 51 images claimed, 50 stored
    (lambda raw: raw[:-7], "header says"),  # truncated data
    (lambda raw: raw[:10], "truncated IDX header"),
])
def test_bad_idx_files_name_the_file(idx_dir: Path, damage, message):
    path = next(idx_dir.glob("train-images-*"))
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    raw = damage(raw)
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)
    with pytest.raises(ValueError, match=message) as caught:
        load_dataset(f"idx:{idx_dir}")
    assert path.name in str(caught.value)


def test_truncated_gzip_is_a_value_error(tmp_path: Path):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    write_idx(path, unique_images(4))
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz"):
        load_dataset(f"idx:{tmp_path}")


def test_missing_idx_file_and_count_mismatch(idx_dir: Path):
    next(idx_dir.glob("t10k-labels-*")).unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        load_dataset(f"idx:{idx_dir}")
    write_idx(idx_dir / "t10k-labels-idx1-ubyte", np.zeros(9, np.uint8))
    with pytest.raises(ValueError, match="10 images but 9 labels"):
        load_dataset(f"idx:{idx_dir}")


def test_real_mnist_through_idx():
    if datasets() is None or not (datasets() / "mnist").is_dir():
        pytest.skip("no MNIST: set VAE_DATASETS to a folder holding mnist/ (IDX files)")
    data = load_dataset(f"idx:{datasets() / 'mnist'}")
    assert (data.channels, data.height, data.width, data.levels) == (1, 28, 28, 256)
    assert len(data.test.images) == 10_000
    assert sum(len(getattr(data, s).images) for s in ("train", "val", "calib")) == 60_000
    assert set(data.test.labels.tolist()) == set(range(10))


# --- folder -----------------------------------------------------------------------------------------------

def test_folder_labels_are_sorted_class_folders(class_folder: Path):
    data = load_dataset(f"folder:{class_folder}")
    assert (data.channels, data.height, data.width, data.levels) == (1, 6, 6, 256)
    labels = np.concatenate([getattr(data, s).labels for s in SPLITS])
    values = np.concatenate([getattr(data, s).images[:, 0, 3, 3] for s in SPLITS]).astype(int)
    assert sorted(labels.tolist()) == [0, 0, 0, 1, 1]
    assert (values // 100 == labels).all()  # the label belongs to the folder the image came from


def test_folder_with_rgb_image_defaults_to_3_channels(class_folder: Path):
    rgb = np.random.default_rng(0).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(class_folder / "dogs" / "rgb.png")
    data = load_dataset(f"folder:{class_folder}")
    assert data.channels == 3
    images = np.concatenate([getattr(data, s).images for s in SPLITS])  # (6, 3, 6, 6)
    colored = images[(images[:, 0] != images[:, 1]).any(axis=(1, 2))]
    assert len(colored) == 1  # the gray images were repeated into R = G = B
    np.testing.assert_array_equal(colored[0], rgb.transpose(2, 0, 1))
    gray = load_dataset(f"folder:{class_folder}", channels=1)
    assert gray.channels == 1


def test_flat_folder_is_unlabelled_and_sizes_must_match(tmp_path: Path):
    for k, size in enumerate([(5, 4)] * 6 + [(7, 7)]):  # (w, h)
        Image.fromarray(np.full(size[::-1], 30 * k, np.uint8)).save(tmp_path / f"{k}.png")
    with pytest.raises(ValueError, match="--image-size"):
        load_dataset(f"folder:{tmp_path}")
    (tmp_path / "6.png").unlink()
    data = load_dataset(f"folder:{tmp_path}")
    assert (data.height, data.width) == (4, 5)
    assert all((getattr(data, s).labels == -1).all() for s in SPLITS)
    with pytest.raises(ValueError, match="no labels"):
        load_dataset(f"folder:{tmp_path}", classes=[0])


def test_folder_of_mixed_sizes_resizes_with_image_size(tmp_path: Path):
    for k, side in enumerate([5, 9, 12, 30]):
        Image.fromarray(np.full((side, side, 3), 40 * k, np.uint8)).save(tmp_path / f"{k}.png")
    data = load_dataset(f"folder:{tmp_path}", image_size=7)
    assert data.train.images.shape[1:] == (3, 7, 7)


# --- npz --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["nhw", "nhw1", "n1hw", "nhw3", "n3hw", "float"])
def test_npz_layouts(tmp_path: Path, layout: str):
    gray = unique_images(40)
    rgb = np.stack([gray, 255 - gray, gray // 2], axis=-1)  # (N, H, W, 3)
    array = {"nhw": gray, "nhw1": gray[..., None], "n1hw": gray[:, None], "nhw3": rgb,
             "n3hw": rgb.transpose(0, 3, 1, 2),
             "float": np.clip(gray - 0.4, 0, 255) / 255}[layout]  # off the grid: must round, not truncate
    np.savez(tmp_path / "d.npz", images=array, labels=np.arange(40) % 4)
    data = load_dataset(f"npz:{tmp_path / 'd.npz'}")
    channels = 3 if "3" in layout else 1
    assert data.train.images.shape[1:] == (channels, 8, 8) and data.levels == 256
    ids = [image_ids(getattr(data, s)) for s in SPLITS]
    assert [len(i) for i in ids] == [26, 3, 3, 8]  # test 20% of all, then val/calib 10% of the rest
    assert sorted(sum(ids, [])) == list(range(40))
    assert all(i == sorted(i) for i in ids)  # each split keeps the source order
    for split in (getattr(data, s) for s in SPLITS):
        np.testing.assert_array_equal(split.images[:, 0], gray[image_ids(split)])
        assert split.labels.tolist() == [i % 4 for i in image_ids(split)]


def test_npz_with_own_test_split_and_channel_forcing(tmp_path: Path):
    rgb = np.random.default_rng(1).integers(0, 256, (30, 3, 6, 6), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x_train=rgb[:20], y_train=np.zeros(20, int), x_test=rgb[20:], y_test=np.ones(10, int))
    gray = load_dataset(f"npz:{tmp_path / 'd.npz'}", channels=1)
    assert gray.test.images.shape == (10, 1, 6, 6) and gray.test.labels.tolist() == [1] * 10
    expected = [np.asarray(Image.fromarray(im.transpose(1, 2, 0)).convert("L")) for im in rgb[20:]]
    np.testing.assert_array_equal(gray.test.images[:, 0], np.stack(expected))  # Pillow's "L" luma, exactly

    np.savez(tmp_path / "g.npz", x_train=rgb[:20, 0], x_test=rgb[20:, 0])
    color = load_dataset(f"npz:{tmp_path / 'g.npz'}", channels=3)
    assert color.test.images.shape == (10, 3, 6, 6)
    np.testing.assert_array_equal(color.test.images[:, 2], rgb[20:, 0])


@pytest.mark.parametrize("arrays, message", [
    ({"pixels": np.zeros((5, 4, 4), np.uint8)}, "expected keys"),
    ({"images": np.full((5, 4, 4), 1.5)}, r"\[0, 1\]"),
    ({"images": np.zeros((5, 4), np.uint8)}, "shape"),
    ({"images": np.zeros((5, 4, 4), np.uint8), "labels": np.zeros(4, int)}, "labels"),
    ({"images": np.zeros((3, 4, 4), np.uint8)}, "too few"),
])
def test_bad_npz_files(tmp_path: Path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=message):
        load_dataset(f"npz:{tmp_path / 'bad.npz'}")


# --- spec and option errors -------------------------------------------------------------------------------

def test_unknown_spec_lists_the_accepted_forms():
    with pytest.raises(ValueError, match="folder:DIR"):
        load_dataset("mnist:/tmp")


def test_missing_path_is_file_not_found(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_dataset(f"idx:{tmp_path / 'nowhere'}")


def test_classes_absent_from_the_data(idx_dir: Path):
    with pytest.raises(ValueError, match="no images with labels"):
        load_dataset(f"idx:{idx_dir}", classes=[42])


@pytest.mark.parametrize("options", [{"channels": 2}, {"image_size": 0}, {"val_fraction": 1.0},
                                     {"val_fraction": 0.6, "calib_fraction": 0.5}])
def test_bad_options(options):
    with pytest.raises(ValueError):
        load_dataset("digits", **options)


# --- to_float and make_loader -----------------------------------------------------------------------------

def test_to_float_scales_by_levels():
    assert to_float(np.array([0, 8, 16], np.uint8), 17).tolist() == [0.0, 0.5, 1.0]
    x = to_float(torch.tensor([0, 255], dtype=torch.uint8), 256)
    assert x.dtype == torch.float32 and x.tolist() == [0.0, 1.0]
    original = torch.tensor([2.0])
    to_float(original, 3)
    assert original.item() == 2.0  # the caller's tensor is not scaled in place


def test_make_loader_batches_and_order(idx_dir: Path):
    split = load_dataset(f"idx:{idx_dir}").train  # 40 images

    def labels(**options) -> list[int]:
        return [y for _, ys in make_loader(split, 256, batch_size=16, **options) for y in ys.tolist()]

    x, y = next(iter(make_loader(split, 256, batch_size=16, shuffle=True, seed=0)))
    assert x.shape == (16, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert labels(shuffle=False, seed=0) == split.labels.tolist()
    assert labels(shuffle=True, seed=1) == labels(shuffle=True, seed=1)
    assert labels(shuffle=True, seed=1) != labels(shuffle=True, seed=2)
    assert sorted(labels(shuffle=True, seed=1)) == sorted(split.labels.tolist())
    assert len(labels(shuffle=True, seed=1, drop_last=True)) == 32
