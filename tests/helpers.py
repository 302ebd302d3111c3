"""Helpers the tests share: waiting for readiness, settings variants, training an artifact through the real
command line, an app serving another artifact, PNG bytes."""

import io
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from service.app import create_app
from service.config import Settings

REPO = Path(__file__).resolve().parents[1]
FORMAT1 = REPO / "tests" / "fixtures" / "vae_format1.ts"  # an artifact of format 1, before later sections existed



def datasets() -> Optional[Path]:
    """The folder holding mnist/ and fashion-mnist/ (IDX files) named by VAE_DATASETS, or None: the tests that
    need real data skip without it, and nothing else does."""
    folder = os.environ.get("VAE_DATASETS")
    return Path(folder) if folder and Path(folder).is_dir() else None


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
