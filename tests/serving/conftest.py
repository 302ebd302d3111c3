"""Fixtures for the service tests: one app on the session's trained digits artifact, real digits as PNGs."""

import io
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from service.app import create_app
from service.config import Settings

# Where the apps below serve (Settings' device "auto"): CUDA on a GPU machine, where these tests run too.
SERVED_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def wait_ready(client: TestClient, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, "service did not become ready"
        time.sleep(0.02)


def variant(settings: Settings, **changes) -> Settings:
    """The same settings with some changed, validated like any other (model_copy would skip validation)."""
    return Settings(**{**settings.model_dump(), **changes})


def train_artifact(tmp_path_factory: pytest.TempPathFactory, name: str, args: list) -> Path:
    """A vae.ts trained through the real training CLI with ``args`` (on CPU: pass ``--device cpu``)."""
    from training.cli import main

    out = tmp_path_factory.mktemp(name) / "vae.ts"
    assert main([*args, "--out", str(out)]) == 0
    return out


@contextmanager
def serving(settings: Settings, model_path: Path) -> Iterator[TestClient]:
    """The app on another artifact with the same settings, started (lifespan run) and warm."""
    with TestClient(create_app(variant(settings, model_path=model_path))) as client:
        wait_ready(client)
        yield client


def png(image: np.ndarray) -> bytes:
    """uint8 (C, H, W) or (H, W) -> PNG bytes."""
    array = image[0] if image.ndim == 3 and image.shape[0] == 1 else image
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="session")
def digit_images(digits_dataset) -> np.ndarray:
    """Real held-out digits as 8-bit images (N, 1, 8, 8): the 17 levels scaled to 0..255."""
    test = digits_dataset.test.images.astype(np.float64)
    return np.round(test * 255.0 / (digits_dataset.levels - 1)).astype(np.uint8)


@pytest.fixture(scope="session")
def noise_images() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(32, 1, 8, 8), dtype=np.uint8)


@pytest.fixture(scope="session")
def settings(digits_artifact: Path) -> Settings:
    return Settings(model_path=digits_artifact, max_n=64, max_steps=32, max_k=256, max_rows=64)


@pytest.fixture(scope="session")
def client(settings: Settings):
    with TestClient(create_app(settings)) as test_client:  # runs the lifespan: load, batcher, warm-up
        wait_ready(test_client)
        yield test_client
