"""The data recipe: every parameter that decides which images land in which split and how they are preprocessed.

Training records it in the artifact's ``data`` section together with a fingerprint of the result (the split
sizes, the image shape and levels, a hash of the calib images). Recalibration rebuilds the calib split from the
recipe and refuses unless the rebuilt split has the same fingerprint: a calib split that overlaps the training
images (another ``--val-fraction`` moves the boundaries) gives training images lower scores than fresh ones, and
the conformal p-values lose their false-positive guarantee without a word.

The split indices depend only on the source's size, the split seed and the split sizes (``data._carve``), so
matching sizes prove the same indices of the same source; the hash proves the same source and preprocessing.
"""

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

from training.data import CALIB_FRACTION, SPLIT_SEED, TEST_FRACTION, VAL_FRACTION, Dataset, load_dataset


@dataclass(frozen=True)
class DataRecipe:
    name: str  # the data spec: digits, idx:DIR, folder:DIR, npz:FILE
    classes: Optional[Tuple[int, ...]] = None  # None: every label
    image_size: Optional[int] = None  # None: the source's own size
    channels: Optional[int] = None  # None: the source's own channels
    val_fraction: float = VAL_FRACTION
    calib_fraction: float = CALIB_FRACTION
    test_fraction: float = TEST_FRACTION
    split_seed: int = SPLIT_SEED
    binarize: bool = False  # a Bernoulli model; the splits themselves are the same

    def load(self) -> Dataset:
        return load_dataset(self.name, image_size=self.image_size, channels=self.channels, classes=self.classes,
                            val_fraction=self.val_fraction, calib_fraction=self.calib_fraction,
                            test_fraction=self.test_fraction, seed=self.split_seed)

    def to_dict(self) -> Dict[str, Any]:
        return dict(dataclasses.asdict(self), classes=None if self.classes is None else list(self.classes))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, assume_defaults: bool = False) -> "DataRecipe":
        """The recipe in an artifact's ``data`` section. A missing field (artifacts written before the recipe was
        recorded) is a ValueError naming it, unless ``assume_defaults``: then it takes the training CLI's default,
        and ``check_fingerprint`` still catches any non-default that changed the split sizes or image shape."""
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [name for name in names if name not in data]
        if missing and not assume_defaults:
            raise ValueError(f"its data section lacks {', '.join(missing)}, so its calib split cannot be rebuilt "
                             "with certainty; retrain, or pass --assume-training-defaults if it was trained with "
                             "the defaults for those (the recorded split sizes are still checked)")
        recipe = {name: data[name] for name in names if name in data}
        if recipe.get("classes") is not None:
            recipe["classes"] = tuple(int(c) for c in recipe["classes"])
        return cls(**recipe)


def images_sha256(images: np.ndarray) -> str:
    """sha256 of uint8 (N, C, H, W) images as C-order bytes (the shape is recorded and checked beside it)."""
    return hashlib.sha256(np.ascontiguousarray(images, dtype=np.uint8).tobytes()).hexdigest()


def fingerprint(ds: Dataset) -> Dict[str, Any]:
    """What a rebuilt dataset must reproduce: split sizes, image shape, pixel levels and the calib images."""
    return {"levels": ds.levels, "n_train": len(ds.train), "n_val": len(ds.val), "n_calib": len(ds.calib),
            "n_test": len(ds.test), "image": {"channels": ds.channels, "height": ds.height, "width": ds.width},
            "calib_sha256": images_sha256(ds.calib.images)}


def check_fingerprint(recorded: Mapping[str, Any], ds: Dataset, *, allow_missing_hash: bool = False) -> None:
    """ValueError naming every recorded fingerprint field that ``ds`` does not reproduce, or that is missing
    (only the hash may be, with ``allow_missing_hash``: artifacts before the recipe never recorded one)."""
    rebuilt = fingerprint(ds)
    optional = {"calib_sha256"} if allow_missing_hash else set()
    missing = [key for key in rebuilt if key not in recorded and key not in optional]
    differ = [f"{key} {recorded[key]} != {value}" for key, value in rebuilt.items()
              if key in recorded and recorded[key] != value]
    if missing or differ:
        raise ValueError("the rebuilt split is not the one it was calibrated on (recorded != rebuilt): "
                         + "; ".join(differ + [f"{key} not recorded" for key in missing]))


def recorded_dataset(recorded: Mapping[str, Any], *, data: Optional[str] = None,
                     assume_defaults: bool = False) -> Dataset:
    """The dataset an artifact was trained beside, rebuilt from its ``data`` section (``data``: the same source
    at another location); ValueError when the recipe is incomplete or the rebuilt splits differ."""
    recipe = DataRecipe.from_dict(recorded, assume_defaults=assume_defaults)
    if data is not None:
        recipe = dataclasses.replace(recipe, name=data)
    ds = recipe.load()
    check_fingerprint(recorded, ds, allow_missing_hash=assume_defaults)
    return ds


def data_section(recipe: DataRecipe, ds: Dataset) -> Dict[str, Any]:
    """The artifact's ``data`` section: the recipe and the fingerprint of what it produced."""
    return {**recipe.to_dict(), **fingerprint(ds)}
