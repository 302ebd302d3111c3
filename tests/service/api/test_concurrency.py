"""Concurrent requests are batched together and get exactly what they would get alone."""

import asyncio
import io

import httpx
import numpy as np

from tests.helpers import variant
from service.app import create_app

NPY = "application/x-npy"


def _npy(array) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


async def _batch_calls(client: httpx.AsyncClient, kernel: str) -> float:
    text = (await client.get("/metrics")).text
    line = next(l for l in text.splitlines() if l.startswith(f'vae_batch_rows_count{{kernel="{kernel}"}}'))
    return float(line.split()[-1])


async def test_64_concurrent_requests_share_few_model_calls_and_match_one_at_a_time(settings, digit_images):
    app = create_app(variant(settings, batch_delay_ms=20.0))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            while (await client.get("/readyz")).status_code != 200:
                await asyncio.sleep(0.02)
            images = [digit_images[i:i + 1] for i in range(64)]

            async def encode(image):
                r = await client.post("/encode", content=_npy(image), headers={"content-type": NPY})
                assert r.status_code == 200, r.text
                return r.json()["mu"]

            async def score(image):
                r = await client.post("/anomaly-score", content=_npy(image), headers={"content-type": NPY})
                assert r.status_code == 200, r.text
                return r.json()["scores"][0]

            alone_mu = [await encode(im) for im in images[:8]]
            alone_score = [await score(im) for im in images[:8]]
            calls_before = await _batch_calls(client, "encode")
            together_mu = await asyncio.gather(*(encode(im) for im in images))
            calls = await _batch_calls(client, "encode") - calls_before
            assert calls <= 8, f"64 concurrent requests took {calls} model calls"
            together_score = await asyncio.gather(*(score(im) for im in images))

    assert together_mu[:8] == alone_mu  # bit-for-bit: rows never depend on their batch mates
    assert together_score[:8] == alone_score
