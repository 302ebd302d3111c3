"""Replacing the model of a running server (``python -m service`` with two server processes, on 127.0.0.1): no
request fails, every answer is the one the model it names gives, a refused reload changes nothing, readiness never
drops, and memory stays bounded over many reloads.

Sixteen clients send /encode and /anomaly-score requests (npy bodies of a few fixed images) while reloads switch
between two artifacts; each answer is kept with the model its X-Model-Sha256 names. Afterwards each model is
served alone and asked the same requests: a row gets the same bits alone or batched, so every answer under load
must equal its model's, byte for byte.
"""

import asyncio
import io
import shutil
import time
from pathlib import Path
from typing import Dict, List, Tuple

import aiohttp
import httpx
import numpy as np
import pytest

from tests.helpers import train_artifact
from tests.reliability.live_server import live_server

pytestmark = pytest.mark.slow  # two server processes under load for minutes; the in-process reload tests are fast

KEY = "r3load-t3st-key"
NPY = "application/x-npy"
CLIENTS = 16


def npy(images: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, images, allow_pickle=False)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def models(digits_artifact, tmp_path_factory) -> Dict[str, Path]:
    """A model directory with two artifacts of the same shape (different seeds) and a corrupt one."""
    folder = tmp_path_factory.mktemp("models")
    shutil.copyfile(digits_artifact, folder / "a.ts")
    other = train_artifact(tmp_path_factory, "reload-b", ["--data", "digits", "--device", "cpu", "--epochs", "3",
                                                          "--seed", "7", "--eval-k", "16", "--score-k", "32",
                                                          "--no-report", "--quiet"])
    shutil.copyfile(other, folder / "b.ts")
    (folder / "corrupt.ts").write_bytes((folder / "b.ts").read_bytes()[: 200_000])
    return {"dir": folder, "a": folder / "a.ts", "b": folder / "b.ts"}


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    with live_server(models["a"], tmp_path_factory.mktemp("reload-server"), processes=2, allow_reload="true",
                     api_key=KEY, request_timeout_s=60) as live:
        yield live


def requests(digit_images) -> List[Tuple[str, bytes]]:
    images = [digit_images[i:i + 1 + i % 3] for i in range(0, 12, 3)]  # 1 to 3 images a request
    return ([("/encode", npy(batch)) for batch in images] +
            [("/anomaly-score", npy(batch)) for batch in images])


async def under_load(url: str, work: List[Tuple[str, bytes]], stop: asyncio.Event) -> List[tuple]:
    """CLIENTS closed-loop clients cycling through ``work`` until ``stop``: (path, body index, status, sha256,
    response body) per request."""
    answers: List[tuple] = []
    headers = {"content-type": NPY, "accept": "application/json", "x-api-key": KEY}
    async with aiohttp.ClientSession(url, timeout=aiohttp.ClientTimeout(total=120)) as client:
        async def one_client(offset: int) -> None:
            i = offset
            while not stop.is_set():
                path, body = work[i % len(work)]
                async with client.post(path, data=body, headers=headers) as response:
                    answers.append((path, i % len(work), response.status, response.headers.get("x-model-sha256"),
                                    await response.read()))
                i += 1

        await asyncio.gather(*(one_client(k) for k in range(CLIENTS)))
    return answers


async def reload_while_loaded(url: str, work, plan: List[dict]) -> Tuple[List[tuple], List[httpx.Response], list]:
    """Send the reloads of ``plan`` one after the other under load; the answers, the reload responses and the
    readiness seen meanwhile."""
    stop = asyncio.Event()
    load = asyncio.ensure_future(under_load(url, work, stop))
    responses, readiness = [], []
    async with httpx.AsyncClient(base_url=url, timeout=180) as admin:
        await asyncio.sleep(1.0)
        for body in plan:
            response = await admin.post("/v1/model/reload", json=body.get("json"),
                                        headers=body.get("headers", {"x-api-key": KEY}))
            responses.append(response)
            readiness.append((await admin.get("/readyz")).status_code)
            await asyncio.sleep(0.3)
        stop.set()
        return await load, responses, readiness


def reference_answers(url: str, work, sha_to_path: Dict[str, str]) -> Dict[Tuple[str, int], bytes]:
    """Each model alone (no load), asked every request of ``work``: (sha256, request index) -> body."""
    reference = {}
    with httpx.Client(base_url=url, headers={"x-api-key": KEY}, timeout=120) as client:
        for sha256, name in sha_to_path.items():
            assert client.post("/v1/model/reload", json={"path": name}).json()["sha256"] == sha256
            for i, (path, body) in enumerate(work):
                response = client.post(path, content=body, headers={"content-type": NPY})
                assert response.status_code == 200 and response.headers["x-model-sha256"] == sha256
                reference[(sha256, i)] = response.content
    return reference


def test_ten_reloads_under_load_lose_nothing_and_every_answer_is_its_models(server, models, digit_images):
    work = requests(digit_images)
    with httpx.Client(base_url=server.url, headers={"x-api-key": KEY}) as client:
        first = client.get("/v1/model").json()["sha256"]
    plan = [{"json": {"path": "b.ts" if i % 2 == 0 else "a.ts"}} for i in range(10)]
    started = time.monotonic()
    answers, responses, readiness = asyncio.run(reload_while_loaded(server.url, work, plan))
    elapsed = time.monotonic() - started
    assert [r.status_code for r in responses] == [200] * 10, [r.text for r in responses]
    shas = {r.json()["sha256"] for r in responses}
    assert len(shas) == 2 and first in shas and all(r.json()["processes"] == 2 for r in responses)
    assert readiness == [200] * 10
    failed = [(path, status) for path, _, status, _, _ in answers if status != 200]
    assert not failed and len(answers) > 100, (failed[:5], len(answers))
    seen = {sha for *_, sha, _ in answers}
    assert seen == shas, seen  # both models answered during the run
    names = {responses[0].json()["sha256"]: "b.ts", responses[1].json()["sha256"]: "a.ts"}
    reference = reference_answers(server.url, work, names)
    wrong = [(path, i, sha[:12]) for path, i, _, sha, body in answers if body != reference[(sha, i)]]
    assert not wrong, (len(wrong), wrong[:5])
    print(f"\n{len(answers)} requests in {elapsed:.1f} s with 10 reloads, 0 failed; reload times (s): "
          + ", ".join(f"{r.elapsed.total_seconds():.2f}" for r in responses))


def test_refused_reloads_change_nothing_and_lose_nothing(server, digit_images):
    work = requests(digit_images)
    with httpx.Client(base_url=server.url, headers={"x-api-key": KEY}) as client:
        serving = client.get("/v1/model").json()["sha256"]
    plan = [{"json": {"path": "corrupt.ts"}}, {"json": {"path": "../a.ts"}}, {"json": {"path": "/etc/hostname"}},
            {"json": {"path": "missing.ts"}}, {"json": None, "headers": {}}, {"json": None, "headers": {"x-api-key": "no"}}]
    answers, responses, readiness = asyncio.run(reload_while_loaded(server.url, work, plan))
    got = [(r.status_code, r.json()["error"]["code"]) for r in responses]
    assert got == [(422, "artifact_refused"), (403, "path_not_allowed"), (403, "path_not_allowed"),
                   (404, "model_not_found"), (401, "unauthorized"), (401, "unauthorized")], got
    assert "corrupt.ts" in responses[0].json()["error"]["message"] and readiness == [200] * len(plan)
    assert {status for _, _, status, _, _ in answers} == {200} and len(answers) > 50
    assert {sha for *_, sha, _ in answers} == {serving}  # the old model answered every request


def test_a_second_reload_while_one_runs_gets_409(server):
    async def two() -> List[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, headers={"x-api-key": KEY}, timeout=180) as admin:
            assert (await admin.post("/v1/model/reload", json={"path": "a.ts"})).status_code == 200
            return list(await asyncio.gather(admin.post("/v1/model/reload", json={"path": "b.ts"}),
                                             admin.post("/v1/model/reload", json={"path": "b.ts"})))

    answers = asyncio.run(two())
    assert sorted(r.status_code for r in answers) == [200, 409], [r.text for r in answers]
    refused = next(r for r in answers if r.status_code == 409)
    assert refused.json()["error"]["code"] == "reload_in_progress"


def test_reload_is_off_unless_enabled(digits_artifact, tmp_path_factory):
    with live_server(digits_artifact, tmp_path_factory.mktemp("no-reload"), processes=1) as live:
        response = httpx.post(live.url + "/v1/model/reload", timeout=30)
        assert response.status_code == 403 and response.json()["error"]["code"] == "reload_disabled"


def test_memory_stays_bounded_over_twenty_reloads(server):
    with httpx.Client(base_url=server.url, headers={"x-api-key": KEY}, timeout=180) as client:
        client.post("/v1/model/reload", json={"path": "a.ts"})
        client.post("/v1/model/reload", json={"path": "b.ts"})
        time.sleep(1.0)
        after_first = server.rss_mib()
        sizes = []
        for i in range(20):
            assert client.post("/v1/model/reload", json={"path": "a.ts" if i % 2 == 0 else "b.ts"}).status_code == 200
            sizes.append(server.rss_mib())
        time.sleep(1.0)
        after = server.rss_mib()
    print(f"\nresident memory, every process: {after_first:.0f} MiB after the first reloads, {after:.0f} MiB after "
          f"20 more (max {max(sizes):.0f})")
    assert after <= 1.10 * after_first, (after_first, after, sizes)


def serving(url: str) -> Dict[str, set]:
    """sha256 -> the pids of the live server processes serving it, from one /metrics scrape."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", headers={"x-api-key": KEY}, timeout=30).text
    pids: Dict[str, set] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "vae_process_model" and sample.value == 1:
                pids.setdefault(sample.labels["sha256"], set()).add(int(sample.labels["pid"]))
    return pids


def serving_processes(url: str) -> Dict[str, int]:
    return {sha: len(pids) for sha, pids in serving(url).items()}


def eventually(check, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.2)


def test_sighup_and_replaced_processes(models, tmp_path_factory):
    """SIGHUP to the server reloads the configured file in every process (after it was replaced on disk), and a
    process started later, after a reload, serves the current model, not the one the server started with."""
    import hashlib
    import os
    import signal

    folder = tmp_path_factory.mktemp("hup-models")
    shutil.copyfile(models["a"], folder / "served.ts")
    shutil.copyfile(models["b"], folder / "b.ts")
    sha = {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in ("served.ts", "b.ts")}
    with live_server(folder / "served.ts", tmp_path_factory.mktemp("hup-server"), processes=2, allow_reload="true",
                     api_key=KEY) as live:
        assert serving_processes(live.url) == {sha["served.ts"]: 2}
        shutil.copyfile(folder / "b.ts", folder / "served.ts.new")
        os.replace(folder / "served.ts.new", folder / "served.ts")  # a new file at the configured path
        os.kill(live.process.pid, signal.SIGHUP)
        assert eventually(lambda: serving_processes(live.url) == {sha["b.ts"]: 2}), serving_processes(live.url)

        shutil.copyfile(models["a"], folder / "a.ts")
        with httpx.Client(base_url=live.url, headers={"x-api-key": KEY}, timeout=180) as client:
            assert client.post("/v1/model/reload", json={"path": "a.ts"}).json()["processes"] == 2
        a_sha = hashlib.sha256(models["a"].read_bytes()).hexdigest()
        before = serving(live.url)[a_sha]
        victim = min(before)
        os.kill(victim, signal.SIGKILL)  # the supervisor starts a replacement

        def replaced():
            now = serving(live.url)
            return list(now) == [a_sha] and len(now[a_sha]) == 2 and victim not in now[a_sha]

        assert eventually(replaced), serving(live.url)  # the replacement serves a.ts, not served.ts
