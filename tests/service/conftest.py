"""Fixtures for the service tests: one app on the session's trained digits artifact."""

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.config import Settings
from tests.helpers import wait_ready


@pytest.fixture(scope="session")
def settings(digits_artifact: Path) -> Settings:
    return Settings(model_path=digits_artifact, max_n=64, max_steps=32, max_k=256, max_rows=64)


@pytest.fixture(scope="session")
def client(settings: Settings):
    with TestClient(create_app(settings)) as test_client:  # runs the lifespan: load, batcher, warm-up
        wait_ready(test_client)
        yield test_client
