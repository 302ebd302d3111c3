"""What decoding an upload will cost is read from the image headers before anything is decoded: a small body
that decodes to a large image is decoded off the event loop, and a request whose images hold more pixels in all
than ``VAE_MAX_REQUEST_PIXELS`` is refused (413) before any of them is decoded, whatever its form."""

import asyncio
import base64
import io
import threading
import time
from typing import List

import numpy as np
import pytest
from PIL import Image

from service.core import codecs
from service.app import create_app
from service.config import Settings
from service.api.inputs import INLINE_BYTES
from tests.reliability.test_faults import in_process, settings_for

SIDE = 4000  # 16 M pixels: within the default max_pixels (4096 * 4096); a black one is a 15.6 KB PNG
BUDGET = 64 * 1024 * 1024  # the default max_request_pixels: four such images fit, five do not


def png(side: int, value: int = 0) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (side, side), value).save(buffer, format="PNG")
    return buffer.getvalue()


def multipart(blobs: List[bytes]) -> dict:
    return {"files": [("file", (f"{i}.png", blob, "image/png")) for i, blob in enumerate(blobs)]}


@pytest.fixture
def decode_threads(monkeypatch) -> List[int]:
    """The thread of every decode_image call from now on."""
    threads: List[int] = []
    real = codecs.decode_image

    def spy(data: bytes, spec: codecs.ImageSpec) -> np.ndarray:
        threads.append(threading.get_ident())
        return real(data, spec)

    monkeypatch.setattr(codecs, "decode_image", spy)
    return threads


async def test_a_small_body_of_many_pixels_is_decoded_off_the_event_loop(digits_artifact, decode_threads):
    big = png(SIDE)
    assert len(big) < INLINE_BYTES  # by its size in bytes, it would have been decoded inline
    loop_thread = threading.get_ident()  # httpx's ASGITransport runs the app on this test's event loop
    async with in_process(create_app(settings_for(digits_artifact))) as client:
        uploads = [client.post("/encode", **multipart([big])) for _ in range(3)]
        responses = await asyncio.gather(*uploads, client.get("/livez"))
        assert [r.status_code for r in responses] == [200] * 4, responses[0].text
        assert len(decode_threads) == 3 and loop_thread not in decode_threads
        decode_threads.clear()
        assert (await client.post("/encode", **multipart([png(8)]))).status_code == 200
        assert decode_threads == [loop_thread]  # a small image still skips the hop to the thread pool


async def test_a_request_over_the_pixel_budget_is_refused_before_decoding(digits_artifact, decode_threads):
    big = png(SIDE)
    async with in_process(create_app(settings_for(digits_artifact))) as client:
        assert Settings().max_request_pixels == BUDGET
        for parts in (5, 200):  # just over the budget, and a few hundred parts (seconds of decoding)
            response = await client.post("/encode", **multipart([big] * parts))
            assert response.status_code == 413, response.text
            assert response.json()["error"]["code"] == "too_large" and str(BUDGET) in response.text
            assert decode_threads == []  # not one image decoded
        assert (await client.post("/encode", **multipart([big] * 4))).status_code == 200  # on the budget: served


@pytest.mark.parametrize("form", ["multipart", "base64 JSON", "npy", "interpolate base64 JSON"])
async def test_every_image_body_counts_against_the_budget(digits_artifact, decode_threads, form):
    # The budget of two 8x8 images is 128 pixels: with 100, one image is served and two are refused.
    small = png(8)
    npy = io.BytesIO()
    np.save(npy, np.zeros((2, 1, 8, 8), np.uint8), allow_pickle=False)
    two = {
        "multipart": ("/encode", multipart([small, small])),
        "base64 JSON": ("/encode", {"json": {"images": [base64.b64encode(small).decode()] * 2}}),
        "npy": ("/encode", {"content": npy.getvalue(), "headers": {"content-type": "application/x-npy"}}),
        "interpolate base64 JSON": ("/interpolate", {"json": {"images": [base64.b64encode(small).decode()] * 2}}),
    }
    path, request = two[form]
    async with in_process(create_app(settings_for(digits_artifact, max_request_pixels=100))) as client:
        response = await client.post(path, **request)
        assert response.status_code == 413 and response.json()["error"]["code"] == "too_large", response.text
        assert "128 pixels" in response.text and decode_threads == []
        if path == "/encode":
            assert (await client.post("/encode", **multipart([small]))).status_code == 200


def test_the_budget_is_a_setting(monkeypatch):
    monkeypatch.setenv("VAE_MAX_REQUEST_PIXELS", "1000")
    assert Settings().max_request_pixels == 1000
