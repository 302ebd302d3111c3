"""Shared fixtures. ``digits_artifact`` trains one small model through the real CLI, once per session."""

from pathlib import Path

import numpy as np
import pytest

from service.core.devices import pin_cpu_numerics
from training.data import Dataset, load_dataset

# As the service does at start: the session trains models in this process before any app is created, and MKL
# fixes its numerics at the process's first matrix product.
pin_cpu_numerics()

# Trained on CPU on every machine, so the fixture is the same model everywhere; a GPU machine serves it on CUDA.
DIGITS_ARGS = ["--data", "digits", "--device", "cpu", "--epochs", "12", "--eval-k", "64", "--score-k", "32",
               "--seed", "0", "--no-report", "--quiet"]


@pytest.fixture(scope="session")
def digits_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path to a vae.ts trained on sklearn digits for a few epochs (logistic likelihood, 17 levels).

    Its metadata holds evaluation, scoring (K=32, noise_seed 0) and calibration scores of the calib split of
    ``load_dataset("digits")`` (the CLI always splits with seed 0, whatever ``--seed``).
    """
    from training.cli import main

    out = tmp_path_factory.mktemp("digits") / "vae.ts"
    assert main([*DIGITS_ARGS, "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def digits_dataset() -> Dataset:
    """The digits splits the session artifact was trained and calibrated on."""
    return load_dataset("digits", seed=0)


@pytest.fixture(scope="session")
def digit_images(digits_dataset) -> np.ndarray:
    """Real held-out digits as 8-bit images (N, 1, 8, 8): the 17 levels scaled to 0..255."""
    test = digits_dataset.test.images.astype(np.float64)
    return np.round(test * 255.0 / (digits_dataset.levels - 1)).astype(np.uint8)


@pytest.fixture(scope="session")
def noise_images() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(32, 1, 8, 8), dtype=np.uint8)
