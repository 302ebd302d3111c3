"""Injected faults on the real app, batcher and runtime: only the affected requests fail, the next ones succeed.

Faults are injected by subclassing ``ModelRuntime`` (the real artifact, loaded for real) and passing it to
``create_app(settings, runtime=...)``: a kernel that raises for one input, a device that runs out of memory
above a batch size, a kernel held at a gate so that rows queue up behind it, a warm-up that waits.
"""

import asyncio
import io
import logging
import socket
import threading
import time
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import AsyncIterator, Dict, FrozenSet, Iterator, List, Optional

import httpx
import numpy as np
import pytest
import torch
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from service.app import create_app
from service.config import Settings
from service.core.runtime import ModelRuntime

NPY = "application/x-npy"
POISON = 13  # an image whose pixels are all 13 (or a latent of all 13.0) makes a FailingKernels kernel raise
HOLD = 77  # an image whose pixels are all 77 waits at the GatedRuntime's gate


def settings_for(artifact: Path, **changes) -> Settings:
    # Two shape buckets instead of three: the warm-up, run by every test's app, takes half as long.
    return Settings(model_path=artifact, device="cpu", max_batch_rows=16, buckets=[4, 16], **changes)


def load(cls, artifact: Path, **kwargs) -> ModelRuntime:
    """The artifact loaded for real by a fault-injecting ModelRuntime subclass, with settings_for's buckets."""
    return cls(artifact, device="cpu", buckets=settings_for(artifact).buckets, **kwargs)


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def from_npy(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.load(io.BytesIO(response.content), allow_pickle=False)


def filled(value: int, n: int = 1) -> np.ndarray:
    """n images whose pixels all have this value."""
    return np.full((n, 1, 8, 8), value, np.uint8)


def noise(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 1, 8, 8), dtype=np.uint8)


def metric(text: str, name: str, **labels) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


async def scrape(client: httpx.AsyncClient, name: str, **labels) -> float:
    return metric((await client.get("/metrics")).text, name, **labels)


async def wait_for(predicate, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


@asynccontextmanager
async def in_process(app, *, ready: bool = True) -> AsyncIterator[httpx.AsyncClient]:
    """The app's lifespan running, and a client talking to it over ASGI."""
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://vae", timeout=60) as client:
            if ready:
                await wait_for(lambda: _is_ready(client), what="readiness")
            yield client


async def _is_ready(client: httpx.AsyncClient) -> bool:
    return (await client.get("/readyz")).status_code == 200


def post_npy(client: httpx.AsyncClient, path: str, array: np.ndarray, **headers):
    return client.post(path, content=npy(array), headers={"content-type": NPY, **headers})


# -- injected faults ------------------------------------------------------------------------------

class FailingKernels(ModelRuntime):
    """Every kernel raises when one of its rows is all POISON, like a model bug that one input triggers."""

    def encode(self, images: np.ndarray) -> Dict[str, np.ndarray]:
        self._check((images == POISON).all(axis=(1, 2, 3)))
        return super().encode(images)

    def decode(self, z: np.ndarray) -> Dict[str, np.ndarray]:
        self._check((z == POISON).all(axis=1))
        return super().decode(z)

    def score(self, images: np.ndarray, k: int, latent: FrozenSet[str] = frozenset()) -> Dict[str, np.ndarray]:
        self._check((images == POISON).all(axis=(1, 2, 3)))
        return super().score(images, k, latent)

    @staticmethod
    def _check(poisoned: np.ndarray) -> None:
        if poisoned.any():
            raise RuntimeError("injected kernel failure")


class TightMemory:
    """Stands in for the artifact's module on a device with little memory: a call on more than ``max_rows`` rows
    raises ``torch.OutOfMemoryError``, as CUDA does. Records (method, rows, fitted) for every call."""

    def __init__(self, module, max_rows: int) -> None:
        self.module, self.max_rows = module, max_rows
        self.calls: List[tuple] = []

    def _call(self, method: str, x: torch.Tensor, *rest):
        fits = x.shape[0] <= self.max_rows
        self.calls.append((method, x.shape[0], fits))
        if not fits:
            raise torch.OutOfMemoryError(f"simulated: {x.shape[0]} rows do not fit")
        return getattr(self.module, method)(x, *rest)

    def encode(self, x):
        return self._call("encode", x)

    def decode(self, z):
        return self._call("decode", z)

    def score(self, x, eps):
        return self._call("score", x, eps)

    def latent_neighbour_distance(self, x):
        return self._call("latent_neighbour_distance", x)

    def latent_log_density(self, x):
        return self._call("latent_log_density", x)


class SmallDevice(ModelRuntime):
    def __init__(self, *args, max_rows: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.module = TightMemory(self.module, max_rows)


class GatedRuntime(ModelRuntime):
    """encode waits at ``gate`` while one of its rows is all HOLD; every non-zero row value it computes is
    recorded in ``computed`` (warm-up rows are zeros)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gate, self.holding = threading.Event(), threading.Event()
        self.computed: List[int] = []

    def encode(self, images: np.ndarray) -> Dict[str, np.ndarray]:
        self.computed.extend(int(v) for v in images[:, 0, 0, 0] if v)
        if (images == HOLD).all(axis=(1, 2, 3)).any():
            self.holding.set()
            assert self.gate.wait(60), "the test never opened the gate"
        return super().encode(images)


class SlowToWarm(ModelRuntime):
    """warm_up waits for ``release`` (or raises ``failure`` when it is set), like a slow first CUDA compile."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.release = threading.Event()
        self.failure: Optional[Exception] = None

    def warm_up(self, *args, **kwargs) -> float:
        assert self.release.wait(60), "the test never released the warm-up"
        if self.failure is not None:
            raise self.failure
        return super().warm_up(*args, **kwargs)


# -- a failing kernel -----------------------------------------------------------------------------

@pytest.mark.parametrize("path, bad, good", [
    ("/encode", filled(POISON), noise(3)),
    ("/anomaly-score", filled(POISON), noise(3)),
    ("/decode", np.full((1, 16), float(POISON), np.float32), np.zeros((3, 16), np.float32)),
])
async def test_a_failing_kernel_fails_only_its_batch(digits_artifact, caplog, path, bad, good):
    runtime = load(FailingKernels, digits_artifact)
    app = create_app(settings_for(digits_artifact, batch_delay_ms=50.0), runtime=runtime)

    def send(client, rows):
        if path == "/decode":
            return client.post(path, json={"z": rows.tolist()})
        return post_npy(client, path, rows)

    async with in_process(app) as client:
        alone = await send(client, bad)
        assert alone.status_code == 500
        error = alone.json()["error"]
        assert error["code"] == "model_error" and len(error["error_id"]) >= 8 and error["error_id"] in error["message"]
        # The id leads from the response to the log line with the cause.
        logged = [r for r in caplog.records if error["error_id"] in r.getMessage()]
        assert logged and logged[0].levelno == logging.ERROR and "injected kernel failure" in str(logged[0].exc_info[1])

        # The poisoned request and good ones at the same time: only requests batched with the poison fail.
        together = await asyncio.gather(send(client, bad), *(send(client, good[i:i + 1]) for i in range(len(good))))
        poisoned = together[0].json()["error"]["error_id"]
        for response in together[1:]:
            assert response.status_code == 200 or response.json()["error"]["error_id"] == poisoned, response.text
        # The worker survived: the next requests all succeed.
        for _ in range(3):
            assert (await send(client, good)).status_code == 200
        assert await scrape(client, "vae_requests_total", endpoint=path, status="500") >= 2


# -- out of memory --------------------------------------------------------------------------------

async def _responses(client: httpx.AsyncClient, rows: np.ndarray) -> dict:
    """Bodies of every kernel's answer for these 16 images: encode, decode of their means, scores."""
    encoded = from_npy(await post_npy(client, "/encode", rows, accept=NPY))
    decoded = from_npy(await client.post("/decode", json={"z": encoded[:, 0].tolist()}, headers={"accept": NPY}))
    scores = await post_npy(client, "/anomaly-score?k=32", rows)
    assert scores.status_code == 200, scores.text
    return {"encode": encoded, "decode": decoded, "score": scores.json()}


async def test_out_of_memory_splits_the_batch_and_gives_identical_results(digits_artifact, caplog):
    rows = noise(16, seed=3)
    # 16 score rows of K=32 in one call (the CPU default holds 1), so every kernel has a 16-row call to split; the
    # same on the device with room, so both compute every row in calls of the sizes the warm-up checked.
    settings = settings_for(digits_artifact, max_score_decodes=16 * 32)
    async with in_process(create_app(settings)) as client:
        expected = await _responses(client, rows)
    small = load(SmallDevice, digits_artifact, max_rows=4, max_score_decodes=16 * 32)
    async with in_process(create_app(settings, runtime=small)) as client:
        small.module.calls.clear()  # forget the warm-up
        with caplog.at_level(logging.WARNING, logger="service.core.runtime"):
            got = await _responses(client, rows)
    np.testing.assert_array_equal(got["encode"], expected["encode"])
    np.testing.assert_array_equal(got["decode"], expected["decode"])
    # Scores: the ELBO terms were computed on 4-row calls instead of one 16-row call, and they depend on the
    # call's size in the last bit (test_scores_do_not_depend_on_the_batch_size); everything else is exact.
    inexact = {"elbo_nats", "reconstruction_nats"}
    for row, want in zip(got["score"].pop("scores"), expected["score"].pop("scores")):
        assert {k: v for k, v in row.items() if k not in inexact} == {k: v for k, v in want.items() if k not in inexact}
        assert [row[k] for k in sorted(inexact)] == pytest.approx([want[k] for k in sorted(inexact)], rel=1e-6)
    assert got["score"] == expected["score"]
    for method in ("encode", "decode", "score"):
        calls = [(n, fits) for m, n, fits in small.module.calls if m == method]
        assert (16, False) in calls, calls  # the whole batch was tried and ran out of memory ...
        assert sum(n for n, fits in calls if fits) == 16 and max(n for n, fits in calls if fits) <= 4, calls
    assert any("out of memory on 16 rows" in r.getMessage() for r in caplog.records)


async def test_scores_do_not_depend_on_the_batch_size(digits_artifact):
    """docs/architecture.md: scoring gives identical results for the same input, batched or not. A split after an out of
    memory error, or simply a busy server, changes the size of the call a row is computed in."""
    rows = noise(16, seed=3)
    async with in_process(create_app(settings_for(digits_artifact))) as client:
        together = (await post_npy(client, "/anomaly-score?k=32", rows)).json()["scores"]
        alone = [(await post_npy(client, "/anomaly-score?k=32", rows[i:i + 1])).json()["scores"][0]
                 for i in range(16)]
    differing = [(i, key, alone[i][key], together[i][key]) for i in range(16) for key in alone[i]
                 if alone[i][key] != together[i][key]]
    assert not differing, differing[:6]


async def test_out_of_memory_on_one_row_fails_that_request_only(digits_artifact):
    small = load(SmallDevice, digits_artifact, max_rows=64)
    async with in_process(create_app(settings_for(digits_artifact), runtime=small)) as client:
        small.module.max_rows = 0  # not even one row fits now
        small.module.calls.clear()
        failed = await post_npy(client, "/encode", noise(2))
        assert failed.status_code == 500 and failed.json()["error"]["code"] == "model_error"
        # The 2-row call, then its first half (one row, padded as a 1-row call is), then it gave up.
        padded = [max(n, small.exact_from["encode"]) for n in (2, 1)]
        assert [(n, fits) for _, n, fits in small.module.calls] == [(padded[0], False), (padded[1], False)]
        small.module.max_rows = 64  # memory is back
        assert (await post_npy(client, "/encode", noise(2))).status_code == 200
        assert (await client.post("/sample", json={"n": 3})).status_code == 200


# -- dropped rows: deadlines and disconnects ------------------------------------------------------

async def test_expired_rows_are_dropped_before_compute_and_counted(digits_artifact):
    runtime = load(GatedRuntime, digits_artifact)
    # One model worker: while it holds the gated row, later rows can only wait in the queue.
    app = create_app(settings_for(digits_artifact, request_timeout_s=0.5, model_workers=1), runtime=runtime)
    async with in_process(app) as client:
        for late, headers, rows in ((91, {"x-request-timeout": "0.2"}, 3), (92, {}, 2)):  # header, then default
            runtime.gate.clear()
            runtime.holding.clear()
            before = await scrape(client, "vae_rejections_total", reason="deadline")
            holder = asyncio.ensure_future(post_npy(client, "/encode", filled(HOLD)))
            await asyncio.get_running_loop().run_in_executor(None, runtime.holding.wait, 30)  # worker busy
            waiter = asyncio.ensure_future(post_npy(client, "/encode", filled(late, rows), **headers))
            await wait_for(lambda: _depth_is(client, rows), what="the late rows to queue")
            await asyncio.sleep(0.7)  # past both deadlines (0.2 s from the header, 0.5 s by default)
            runtime.gate.set()
            assert (await holder).status_code == 200
            response = await waiter
            assert response.status_code == 504 and "retry-after" not in response.headers  # retrying would not help
            assert response.json()["error"]["code"] == "deadline_exceeded"
            assert late not in runtime.computed  # dropped, not computed and thrown away
            assert await scrape(client, "vae_rejections_total", reason="deadline") - before == rows
        assert (await post_npy(client, "/encode", noise(2))).status_code == 200


async def _depth_is(client: httpx.AsyncClient, rows: int) -> bool:
    return await scrape(client, "vae_queue_depth", kernel="encode") == rows


@contextmanager
def served(app) -> Iterator[str]:
    """The app behind a real uvicorn server on a loopback port, in a thread; stopped on exit."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        yield "http://127.0.0.1:%d" % sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def test_rows_of_a_disconnected_client_are_dropped_and_counted(digits_artifact):
    runtime = load(GatedRuntime, digits_artifact)
    app = create_app(settings_for(digits_artifact, model_workers=1), runtime=runtime)  # see above
    gone, rows = 93, 3
    with served(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        deadline = time.monotonic() + 60
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)

        def value(name: str, **labels) -> float:
            return metric(client.get("/metrics").text, name, **labels)

        def until(predicate, what: str) -> None:
            deadline = time.monotonic() + 30
            while not predicate():
                assert time.monotonic() < deadline, f"timed out waiting for {what}"
                time.sleep(0.02)

        holder: Dict[str, httpx.Response] = {}
        thread = threading.Thread(target=lambda: holder.update(r=httpx.post(
            f"{url}/encode", content=npy(filled(HOLD)), headers={"content-type": NPY}, timeout=60)))
        thread.start()
        assert runtime.holding.wait(30)  # the worker is busy with the holder's row
        body = npy(filled(gone, rows))
        with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as raw:
            raw.sendall(b"POST /encode HTTP/1.1\r\nHost: vae\r\nContent-Type: application/x-npy\r\n"
                        b"Content-Length: %d\r\n\r\n" % len(body) + body)
            until(lambda: value("vae_queue_depth", kernel="encode") == rows, "the rows to queue")
        # The client hung up while its rows waited; the server notices, the rows must never be computed.
        until(lambda: value("vae_requests_total", endpoint="/encode", status="499") == 1, "the disconnect")
        runtime.gate.set()
        thread.join(timeout=60)
        assert holder["r"].status_code == 200
        until(lambda: value("vae_rejections_total", reason="disconnected") == rows, "the dropped rows to be counted")
        assert gone not in runtime.computed
        assert value("vae_queue_depth", kernel="encode") == 0
        assert client.post("/encode", content=npy(noise(2)), headers={"content-type": NPY}).status_code == 200


# -- readiness --------------------------------------------------------------------------------------

async def test_readiness_is_503_until_warm_and_again_while_draining(digits_artifact):
    runtime = load(SlowToWarm, digits_artifact)
    app = create_app(settings_for(digits_artifact), runtime=runtime)
    async with in_process(app, ready=False) as client:
        await asyncio.sleep(0.2)  # the warm-up has had every chance to finish, were it not held
        warming = await client.get("/readyz")
        assert warming.status_code == 503 and warming.json() == {"status": "warming_up"}
        assert warming.headers["retry-after"] == "1"
        assert (await client.get("/livez")).status_code == 200  # alive: do not restart it, just do not route to it
        refused = await post_npy(client, "/encode", noise(1))
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "not_ready"
        assert refused.headers["retry-after"] == "1"
        assert await scrape(client, "vae_ready") == 0
        runtime.release.set()
        await wait_for(lambda: _is_ready(client), what="readiness after the warm-up")
        assert await scrape(client, "vae_ready") == 1
        assert (await post_npy(client, "/encode", noise(1))).status_code == 200
    # The lifespan has ended (what uvicorn does after SIGTERM once in-flight requests are done).
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://vae") as client:
        draining = await client.get("/readyz")
        assert draining.status_code == 503 and draining.json() == {"status": "draining"}
        assert (await client.get("/livez")).status_code == 200
        assert await scrape(client, "vae_ready") == 0
        refused = await post_npy(client, "/encode", noise(1))
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"


async def test_a_failed_warm_up_is_logged_and_never_ready(digits_artifact, caplog):
    runtime = load(SlowToWarm, digits_artifact)
    runtime.failure = RuntimeError("injected warm-up failure")
    app = create_app(settings_for(digits_artifact), runtime=runtime)
    async with in_process(app, ready=False) as client:
        runtime.release.set()
        await asyncio.sleep(0.5)
        assert (await client.get("/readyz")).status_code == 503
        assert (await post_npy(client, "/encode", noise(1))).status_code == 503
        assert any(r.levelno >= logging.ERROR and r.exc_info and "injected warm-up failure" in str(r.exc_info[1])
                   for r in caplog.records), "the warm-up failure was not logged"
