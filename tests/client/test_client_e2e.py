"""End to end: ``python -m service`` in a real process, driven by ``VAEClient`` and ``AsyncVAEClient``.

Most tests run once per client (the ``vae`` fixture); ``call`` awaits the async client's results so one test
body checks both. The module's server process is shared; the last test that uses it stops it with SIGTERM. The
in-process tests at the end serve the app over ``httpx.ASGITransport`` for what a default server cannot show
(API keys, a full queue, retries, draining).
"""

import asyncio
import inspect
import io
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import httpx
import numpy as np
import pytest
import pytest_asyncio
from PIL import Image

import vae_client
from service.app import create_app
from service.config import Settings
from vae_client import (
    AnomalyResult, APIError, AsyncVAEClient, BadRequest, Encoding, Overloaded, ReadyTimeout, Samples,
    TransportError, Unauthorized, VAEClient, VAEError,
)

REPO = Path(__file__).resolve().parents[2]
GRACE_S = 5.0  # the server's grace period for SIGTERM (VAE_GRACE_PERIOD_S)


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(digits_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    env = {**os.environ, "VAE_GRACE_PERIOD_S": str(GRACE_S)}
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "service", "--model", str(digits_artifact), "--host", "127.0.0.1",
             "--port", str(port), "--device", "cpu", "--log-level", "warning"],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
        )
    running = Server(f"http://127.0.0.1:{port}", process, log)
    try:
        with VAEClient(base_url=running.url) as client:
            try:
                client.wait_until_ready(60)
            except ReadyTimeout:
                pytest.fail(f"server not ready (exit code {process.poll()}):\n{running.log_tail()}")
        yield running
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)


@pytest_asyncio.fixture(params=["sync", "async"], loop_scope="function")
async def vae(request: pytest.FixtureRequest, server: Server):
    if request.param == "sync":
        with VAEClient(base_url=server.url) as client:
            yield client
    else:
        async with AsyncVAEClient(base_url=server.url) as client:
            yield client


async def call(result: Any) -> Any:
    """The sync client's result as is; the async client's awaited."""
    return await result if inspect.isawaitable(result) else result


@pytest.fixture(scope="module")
def digits(digits_dataset) -> np.ndarray:
    """Five test digits as 8-bit images (N, 1, 8, 8): the dataset's 17 levels scaled to 0..255."""
    levels = digits_dataset.levels
    return np.rint(digits_dataset.test.images[:5].astype(np.float64) * 255 / (levels - 1)).astype(np.uint8)


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image[0]).save(buffer, format="PNG")
    return buffer.getvalue()


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(pixels * 255), 0, 255).astype(np.uint8)


def arrays(images) -> np.ndarray:
    return np.stack([np.asarray(image) for image in images])


async def test_ops(vae, server: Server):
    assert await call(vae.ready()) is True
    info = await call(vae.model_info())
    assert info["image"] == {"channels": 1, "height": 8, "width": 8}
    assert info["score_k"] == 32 and len(info["sha256"]) == 64
    assert "scores" not in info["metadata"]["calibration"]
    # /livez and /metrics are for orchestrators, not client methods.
    assert httpx.get(f"{server.url}/livez").json() == {"status": "alive"}
    metrics = httpx.get(f"{server.url}/metrics").text
    assert "vae_ready 1.0" in metrics and 'vae_requests_total{endpoint="/readyz",role="probe",status="200"}' in metrics


async def test_encode_every_input_form_agrees(vae, digits: np.ndarray):
    encoding = await call(vae.encode(digits))  # (N, C, H, W) as npy
    assert isinstance(encoding, Encoding) and encoding.z is None and encoding.seed is None
    assert encoding.mu.shape == encoding.logvar.shape == (5, 16) and encoding.mu.dtype == np.float32
    for images in (digits[:, 0], [png(d) for d in digits], [Image.fromarray(d[0]) for d in digits]):
        other = await call(vae.encode(images))
        np.testing.assert_array_equal(other.mu, encoding.mu)
        np.testing.assert_array_equal(other.logvar, encoding.logvar)
    one = await call(vae.encode(Image.fromarray(digits[0, 0])))
    assert one.mu.shape == (1, 16)


async def test_encode_sample_is_seeded(vae, digits: np.ndarray):
    first = await call(vae.encode(digits, sample=True, seed=7))
    again = await call(vae.encode(digits, sample=True, seed=7))
    other = await call(vae.encode(digits, sample=True, seed=8))
    assert first.seed == 7 and first.z.shape == (5, 16)
    np.testing.assert_array_equal(first.z, again.z)
    assert not np.array_equal(first.z, other.z) and not np.array_equal(first.z, first.mu)
    unseeded = await call(vae.encode(digits[:1], sample=True))
    assert isinstance(unseeded.seed, int) and unseeded.z.shape == (1, 16)


async def test_decode_images_are_the_rounded_pixel_means(vae, digits: np.ndarray):
    mu = (await call(vae.encode(digits))).mu
    images = await call(vae.decode(mu))
    pixels = await call(vae.decode_array(mu))
    assert len(images) == 5 and all(im.mode == "L" and im.size == (8, 8) for im in images)
    assert pixels.shape == (5, 1, 8, 8) and pixels.dtype == np.float32
    assert 0.0 <= pixels.min() and pixels.max() <= 1.0
    np.testing.assert_array_equal(arrays(images), to_uint8(pixels)[:, 0])
    np.testing.assert_array_equal(await call(vae.decode_array(mu[0])), pixels[:1])  # one (D,) vector


async def test_sample_is_deterministic_for_a_seed(vae):
    first = await call(vae.sample(3, seed=11))
    again = await call(vae.sample(3, seed=11))
    other = await call(vae.sample(3, seed=12))
    assert isinstance(first, Samples) and first.seed == 11 and first.z.shape == (3, 16)
    assert len(first.images) == 3 and first.images[0].size == (8, 8)
    np.testing.assert_array_equal(first.z, again.z)
    np.testing.assert_array_equal(arrays(first.images), arrays(again.images))
    assert not np.array_equal(first.z, other.z)
    cooler = await call(vae.sample(3, seed=11, temperature=0.5))
    np.testing.assert_allclose(cooler.z, 0.5 * first.z, rtol=1e-6)
    assert isinstance((await call(vae.sample(1))).seed, int)


async def test_interpolate_ends_decode_the_encoded_means(vae, digits: np.ndarray):
    mu = (await call(vae.encode(digits[:2]))).mu
    ends = to_uint8(await call(vae.decode_array(mu)))[:, 0]
    pil = [Image.fromarray(d[0]) for d in digits[:2]]
    for a, b in ((pil[0], pil[1]), (digits[0], digits[1]), (png(digits[0]), png(digits[1])), (mu[0], mu[1])):
        frames = await call(vae.interpolate(a, b, steps=6))
        assert len(frames) == 6 and all(f.size == (8, 8) for f in frames)
        np.testing.assert_array_equal(np.asarray(frames[0]), ends[0])
        np.testing.assert_array_equal(np.asarray(frames[-1]), ends[1])
    linear = await call(vae.interpolate(mu[0], mu[1], steps=3, method="linear"))
    np.testing.assert_array_equal(arrays(linear), arrays(await call(vae.decode([mu[0], (mu[0] + mu[1]) / 2, mu[1]]))))
    with pytest.raises(TypeError, match="both be images or both be latent"):
        await call(vae.interpolate(pil[0], mu[1]))


async def test_anomaly_score(vae, digits: np.ndarray):
    noise = np.random.default_rng(0).integers(0, 256, size=(3, 8, 8), dtype=np.uint8)
    normal = await call(vae.anomaly_score(digits))  # alpha 0.01: the smallest p-value is 1 / (n + 1) < 0.01
    strange = await call(vae.anomaly_score(noise))
    assert isinstance(normal, AnomalyResult) and normal.k == 32
    assert normal.calibration["calibrated"] is True and normal.calibration["n"] > 100
    for result, n in ((normal, 5), (strange, 3)):
        assert result.nll_nats.shape == result.p_value.shape == result.is_anomaly.shape == (n,)
        assert np.isfinite(result.nll_nats).all() and ((0 < result.p_value) & (result.p_value <= 1)).all()
        np.testing.assert_allclose(result.nll_bits_per_dim, result.nll_nats / (64 * np.log(2)), rtol=1e-5)
    assert strange.nll_nats.min() > normal.nll_nats.max()
    assert strange.is_anomaly.all() and normal.is_anomaly.sum() <= 1
    again = await call(vae.anomaly_score(digits))
    np.testing.assert_array_equal(again.nll_nats, normal.nll_nats)  # scoring noise is seeded
    other_k = await call(vae.anomaly_score(digits[:1], k=8, tail="two-sided"))
    assert other_k.k == 8 and other_k.calibration["calibrated"] is False and other_k.calibration["k"] == 32
    assert np.isnan(other_k.p_value).all() and np.isnan(other_k.percentile).all() and other_k.is_anomaly is None
    assert np.isfinite(other_k.score_nats).all()
    plain = await call(vae.anomaly_score(digits, score="nll"))  # the score kind the p-values refer to
    assert plain.score == "nll" and np.isnan(plain.complexity_bits).all()
    np.testing.assert_array_equal(plain.score_nats, plain.nll_nats)
    assert normal.score == "density-bz2" and (normal.complexity_bits > 0).all()  # the default (docs/anomaly.md)
    assert np.isfinite(normal.latent_density_nats).all() and np.isnan(normal.neighbour_distance).all()
    assert np.isnan(plain.latent_density_nats).all()
    nearest = await call(vae.anomaly_score(digits, score="fisher-bz2-nn"))
    assert (nearest.neighbour_distance >= 0).all() and np.isnan(nearest.latent_density_nats).all()
    corrected = await call(vae.anomaly_score(digits, score="nll-minus-bz2"))  # NLL - compressed size
    np.testing.assert_allclose(corrected.score_nats, corrected.nll_nats - corrected.complexity_bits * np.log(2),
                               rtol=1e-5)
    with pytest.raises(BadRequest, match="nll"):
        await call(vae.anomaly_score(digits[:1], score="no-such-kind"))


async def test_errors_map_to_exception_classes(vae):
    with pytest.raises(BadRequest) as wrong_size:
        await call(vae.decode(np.zeros((1, 3))))
    assert wrong_size.value.status == 422 and wrong_size.value.code == "invalid_input"
    assert "latent size is 16" in wrong_size.value.message
    with pytest.raises(BadRequest) as corrupt:
        await call(vae.encode([b"not an image"]))
    assert corrupt.value.code == "invalid_image" and isinstance(corrupt.value, APIError)
    with pytest.raises(BadRequest) as too_large:
        await call(vae.anomaly_score(np.zeros((1, 8, 8), np.uint8), k=10**6))
    assert too_large.value.status == 413 and too_large.value.code == "too_large"
    with pytest.raises(ValueError, match="NaN"):
        await call(vae.decode([[float("nan")] * 16]))  # refused before sending


async def test_async_concurrent_samples_match_one_by_one(server: Server):
    seeds = range(8)
    async with AsyncVAEClient(base_url=server.url) as client:
        together = await asyncio.gather(*(client.sample(2, seed=s) for s in seeds))
    with VAEClient(base_url=server.url) as client:
        alone = [client.sample(2, seed=s) for s in seeds]
    for batched, single in zip(together, alone):
        np.testing.assert_array_equal(batched.z, single.z)
        np.testing.assert_array_equal(arrays(batched.images), arrays(single.images))


async def test_transport_errors():
    url = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    with VAEClient(base_url=url, timeout=2) as client:
        with pytest.raises(TransportError) as refused:
            client.model_info()
        assert isinstance(refused.value.__cause__, httpx.ConnectError) and isinstance(refused.value, VAEError)
        with pytest.raises(ReadyTimeout):
            client.wait_until_ready(0.3, interval=0.05)
    async with AsyncVAEClient(base_url=url, timeout=2) as client:
        with pytest.raises(TransportError):
            await client.sample(1)
        with pytest.raises(TimeoutError):
            await client.wait_until_ready(0.3, interval=0.05)


def test_client_does_not_import_torch():
    code = "import sys, vae_client; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


def test_sigterm_exits_zero_within_the_grace_period(server: Server):
    # After every other test of the shared server (pytest keeps file order): it ends that server.
    assert server.process.poll() is None, server.log_tail()
    server.process.send_signal(signal.SIGTERM)
    try:
        code = server.process.wait(timeout=GRACE_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running {GRACE_S} s after SIGTERM:\n{server.log_tail()}")
    assert code == 0, server.log_tail()


# In process: the app over httpx.ASGITransport (async only: the sync client has no ASGI transport).

def _settings(artifact: Path) -> Settings:
    # A queue of 4 rows: a 5-image request is refused at once with 503 queue_full.
    return Settings(model_path=artifact, device="cpu", api_key="s3cret", queue_limit=4)


def _count(metrics: str, endpoint: str, status: int) -> float:
    prefix = f'vae_requests_total{{endpoint="{endpoint}",role="model",status="{status}"}} '
    return sum(float(line[len(prefix):]) for line in metrics.splitlines() if line.startswith(prefix))


class RecordedSleeps:
    """Stands in for the client module's asyncio: records how long the client asks to sleep, and returns at once."""

    def __init__(self) -> None:
        self.slept = []

    def __getattr__(self, name):
        return getattr(asyncio, name)

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)


async def test_in_process_keys_queue_and_retries(digits_artifact: Path, digits: np.ndarray, monkeypatch):
    app = create_app(_settings(digits_artifact))
    transport = httpx.ASGITransport(app)
    async with app.router.lifespan_context(app):
        async with AsyncVAEClient(base_url="http://vae", transport=transport, api_key="s3cret") as vae:
            await vae.wait_until_ready(30)
            assert (await vae.sample(2, seed=1)).z.shape == (2, 16)
            with pytest.raises(Overloaded) as full:
                await vae.encode(digits)  # 5 rows > queue_limit 4
            assert full.value.status == 503 and full.value.code == "queue_full" and full.value.retry_after >= 1
        async with AsyncVAEClient(base_url="http://vae", transport=transport, api_key="s3cret", retries=2,
                                  max_retry_wait=0.01) as patient:
            before = _count((await transport_get(transport, "/metrics")), "/encode", 503)
            sleeps = RecordedSleeps()
            monkeypatch.setattr(vae_client, "asyncio", sleeps)
            with pytest.raises(Overloaded):
                await patient.encode(digits)
            monkeypatch.undo()
            assert sleeps.slept == [0.01, 0.01]  # Retry-After (>= 1 s) capped at max_retry_wait, before each retry
            after = _count((await transport_get(transport, "/metrics")), "/encode", 503)
            assert after - before == 3  # the first try and two retries
        for key in (None, "wrong"):
            async with AsyncVAEClient(base_url="http://vae", transport=transport, api_key=key) as stranger:
                assert await stranger.ready() is True  # health endpoints need no key
                with pytest.raises(Unauthorized) as denied:
                    await stranger.sample(1)
                assert denied.value.status == 401 and denied.value.code == "unauthorized"


async def test_in_process_draining_is_overloaded(digits_artifact: Path):
    app = create_app(_settings(digits_artifact))
    async with AsyncVAEClient(base_url="http://vae", transport=httpx.ASGITransport(app), api_key="s3cret") as vae:
        async with app.router.lifespan_context(app):
            await vae.wait_until_ready(30)
            assert await vae.ready() is True
        # The lifespan has ended: the app drains and refuses work with 503 + Retry-After.
        assert await vae.ready() is False
        with pytest.raises(Overloaded) as draining:
            await vae.sample(1)
        assert draining.value.code == "not_ready" and draining.value.retry_after == 1.0
        with pytest.raises(ReadyTimeout, match="503"):
            await vae.wait_until_ready(0.2, interval=0.05)


async def transport_get(transport: httpx.ASGITransport, path: str) -> str:
    # With an API key set, /metrics needs it too.
    async with httpx.AsyncClient(transport=transport, base_url="http://vae", headers={"x-api-key": "s3cret"}) as client:
        return (await client.get(path)).text
