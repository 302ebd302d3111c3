"""X-Request-Timeout: a floor below which a deadline means nothing, and a passed deadline told apart from overload.

A request whose deadline passed gets 504 ``deadline_exceeded`` and no Retry-After: sent again as it is, it would
expire again. A full queue stays 503 ``queue_full`` with Retry-After: the same request a little later is served.
"""

import io

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.app import create_app
from service.config import Settings

QUEUE_LIMIT = 4


@pytest.fixture(scope="module")
def client(digits_artifact):
    settings = Settings(model_path=digits_artifact, device="cpu", max_batch_rows=16, buckets=[4, 16],
                        queue_limit=QUEUE_LIMIT)
    with TestClient(create_app(settings)) as client:
        while client.get("/readyz").status_code != 200:
            pass
        yield client


def slow_png() -> bytes:
    """A 2000x2000 PNG (4 M source pixels, a few KB): decoding it takes milliseconds on any machine."""
    buffer = io.BytesIO()
    Image.new("L", (2000, 2000), 40).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("value", ["5e-324", "1e-9", "0.0009", "0", "-0.0", "nan", "inf", "3600.5", "soon", "1_0",
                                   "0x10", ".5"])
def test_a_timeout_outside_its_range_is_refused(client, value):
    response = client.post("/sample", json={"n": 1}, headers={"x-request-timeout": value})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "validation_error" and "[0.001, 3600]" in error["message"], error


@pytest.mark.parametrize("value", ["0.5", "30", "3600", "3600.0", "1e-2", "2E+1"])
def test_a_timeout_in_range_is_accepted(client, value):
    assert client.post("/sample", json={"n": 1}, headers={"x-request-timeout": value}).status_code == 200


def test_an_expired_deadline_is_504_without_retry_after(client):
    # The deadline starts when the request is admitted; decoding the image alone outlasts the 1 ms floor, so
    # the rows reach the queue already late and are dropped there.
    response = client.post("/encode", files={"file": ("a.png", slow_png(), "image/png")},
                           headers={"x-request-timeout": "0.001"})
    assert response.status_code == 504, response.text
    assert response.json()["error"]["code"] == "deadline_exceeded"
    assert "retry-after" not in response.headers


def test_a_full_queue_is_still_503_with_retry_after(client):
    rows = np.zeros((QUEUE_LIMIT + 1, 1, 8, 8), np.uint8)
    buffer = io.BytesIO()
    np.save(buffer, rows, allow_pickle=False)
    response = client.post("/encode", content=buffer.getvalue(), headers={"content-type": "application/x-npy"})
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "queue_full"
    assert int(response.headers["retry-after"]) >= 1


def test_the_openapi_document_states_the_range_and_the_504(client):
    spec = client.get("/openapi.json").json()
    for path in ("/encode", "/decode", "/sample", "/interpolate", "/anomaly-score"):
        operation = spec["paths"][path]["post"]
        header = next(p for p in operation["parameters"] if p["name"] == "x-request-timeout")
        assert header["schema"]["minimum"] == 0.001 and header["schema"]["maximum"] == 3600, header
        assert "504" in operation["responses"], path
