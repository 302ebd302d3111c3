"""Several server processes behind one port, as real uvicorn processes on 127.0.0.1: they answer bit for bit as
one process does, one /metrics scrape describes all of them, and a killed process turns the server unready
until its replacement is warm."""

import io
import os
import re
import signal
import time
from pathlib import Path
from typing import Dict, List

import httpx
import numpy as np
import pytest

from tests.reliability.live_server import LiveServer, children, live_server

NPY = "application/x-npy"
SETTINGS = dict(torch_threads=1, log_level="warning")


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


IMAGES = np.random.default_rng(7).integers(0, 256, size=(5, 1, 8, 8), dtype=np.uint8)


def fresh(url: str) -> httpx.Client:
    """A client that opens a new connection per request, so the kernel hands requests to any process."""
    return httpx.Client(base_url=url, timeout=30.0, limits=httpx.Limits(max_keepalive_connections=0))


def answers(url: str) -> Dict[str, bytes]:
    with fresh(url) as client:
        encoded = client.post("/encode", content=npy(IMAGES), headers={"content-type": NPY, "accept": NPY})
        mu = np.load(io.BytesIO(encoded.content))[:, 0]
        out = {
            "encode": encoded,
            "decode": client.post("/decode", json={"z": mu.tolist()}, headers={"accept": NPY}),
            "sample": client.post("/sample", json={"n": 3, "seed": 11}),
            "score": client.post("/anomaly-score", content=npy(IMAGES), headers={"content-type": NPY}),
        }
    assert all(r.status_code == 200 for r in out.values()), {k: r.text[:200] for k, r in out.items()}
    return {name: r.content for name, r in out.items()}


def cpu_ticks(pids: List[int]) -> Dict[int, int]:
    """utime + stime of each process, in clock ticks."""
    ticks = {}
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks[pid] = int(fields[11]) + int(fields[12])
    return ticks


def servers_of(server: LiveServer) -> List[int]:
    """The server processes under the supervisor (its children that run uvicorn, not multiprocessing's tracker)."""
    return [pid for pid in children(server.process.pid)
            if "resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")]


def scrape(url: str) -> str:
    with httpx.Client(base_url=url, timeout=10.0) as client:
        return client.get("/metrics").text


def value(text: str, name: str, **labels) -> List[float]:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.compile(rf"^{name}(\{{[^}}]*\}})? (\S+)$", re.M)
    return [float(m.group(2)) for m in pattern.finditer(text) if all(f'{k}="{v}"' in (m.group(1) or "")
                                                                       for k, v in labels.items()) or not want]


@pytest.fixture(scope="module")
def two(digits_artifact, tmp_path_factory):
    with live_server(digits_artifact, tmp_path_factory.mktemp("two"), processes=2, **SETTINGS) as server:
        yield server


def test_every_process_answers_bit_for_bit_as_one_process_does(digits_artifact, tmp_path, two):
    with live_server(digits_artifact, tmp_path, processes=1, **SETTINGS) as one:
        expected = answers(one.url)
    pids = servers_of(two)
    assert len(pids) == 2
    before = cpu_ticks(pids)
    for _ in range(6):  # new connections: both processes get some of them
        assert answers(two.url) == expected
    after = cpu_ticks(pids)
    assert all(after[pid] > before[pid] for pid in pids), (before, after)


def test_one_scrape_sums_every_process(two):
    start = value(scrape(two.url), "vae_requests_total", endpoint="/sample", status="200")
    with fresh(two.url) as client:
        for seed in range(30):
            assert client.post("/sample", json={"n": 1, "seed": seed}).status_code == 200
    text = scrape(two.url)
    assert value(text, "vae_requests_total", endpoint="/sample", status="200")[0] == (start[0] if start else 0) + 30
    assert sorted(value(text, "vae_process_ready")) == [1.0, 1.0]  # one sample per process
    assert value(text, "vae_ready") == [1.0]
    capacity = value(text, "vae_queue_capacity", kernel="encode")
    assert capacity == [2 * 2048.0]  # each process's queue, summed
    assert sum(value(text, "vae_batch_rows_count", kernel="decode")) >= 30


def test_a_killed_process_is_replaced_and_the_server_is_unready_meanwhile(digits_artifact, tmp_path):
    with live_server(digits_artifact, tmp_path, processes=2, **SETTINGS) as server:
        victim, survivor = servers_of(server)
        os.kill(victim, signal.SIGKILL)
        with httpx.Client(base_url=server.url, timeout=5.0) as client:
            assert client.get("/readyz").status_code == 503  # at once: never half-serving while ready
            assert client.post("/sample", json={"n": 1, "seed": 1}).status_code == 200  # the survivor serves
            deadline = time.monotonic() + 60
            while client.get("/readyz").status_code != 200:
                assert time.monotonic() < deadline, server.log_tail()
                time.sleep(0.1)
        replaced = servers_of(server)
        assert survivor in replaced and victim not in replaced and len(replaced) == 2
        assert sorted(value(scrape(server.url), "vae_process_ready")) == [1.0, 1.0]


def test_sigterm_stops_every_process_with_status_0(digits_artifact, tmp_path):
    with live_server(digits_artifact, tmp_path, processes=2, **SETTINGS) as server:
        pids = servers_of(server)
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=30) == 0, server.log_tail()
        assert not any(Path(f"/proc/{pid}").exists() for pid in pids)
