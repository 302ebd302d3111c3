"""SIGTERM under load: accepted requests finish, new ones are refused, the process exits 0 within the grace period.

A real server at about twice its capacity (so its queue is full when the signal comes) gets SIGTERM after 3 s
of load; the generator keeps sending for 3 s more. A request sent before the signal must end in a 2xx, a 503
with Retry-After (refused before any work: the queue was full) or a refused connection. A request sent after
it must be refused: a 503 with Retry-After (draining), or a transport error with no response at all. The second
kind is a refusal too, not a drop: once draining, the application answers 503 to every request it reads, so
a request that got no response was never read. The listener is closed (connection refused), or the client
wrote to an idle keep-alive connection in the same instant the server closed it (a reset; RFC 9112 section
9.3.1 leaves retrying to the client, and Kubernetes' preStop sleep keeps new traffic away during the drain).
Anything else (a timeout, another status, a transport error for a request sent before the signal) is an
accepted request that was dropped.

The client keeps connections alive, as the project's client and most service-to-service clients do. Not covered:
a client that opens a new connection per request. On shutdown uvicorn closes every connection that has no
request in progress, including one it accepted whose request bytes it has not read yet, so such a client can
see a reset for a request the application never saw.
"""

import asyncio
import io
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from tests.reliability.live_server import live_server
from tests.reliability.loadgen import Request, closed_loop, open_loop, session, status_counts

pytestmark = pytest.mark.slow

GRACE_S = 10.0
SIGNAL_DELIVERY_S = 0.05  # from the test's send_signal to the server acting on it (below)


def _one_image() -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.random.default_rng(0).integers(0, 256, size=(1, 1, 8, 8), dtype=np.uint8), allow_pickle=False)
    return buffer.getvalue()


async def _load_then_sigterm(server, request: Request):
    async with session(server.url, max_connections=256) as client:
        measured = await closed_loop(client, request, concurrency=16, duration=3.0)
        capacity = len(measured) / 3.0
        loop = asyncio.get_running_loop()
        signalled = {}

        def terminate() -> None:
            signalled["at"] = time.monotonic()
            server.process.send_signal(signal.SIGTERM)

        loop.call_later(3.0, terminate)
        result = await open_loop(client, request, rate=2.0 * capacity, duration=6.0, max_in_flight=256)
    return result, signalled["at"]


@pytest.mark.parametrize("processes", [1, 2])
def test_sigterm_under_load_drops_no_accepted_request(digits_artifact: Path, tmp_path: Path, processes: int):
    """With 2 processes, the supervisor passes the signal on and every process drains its own requests."""
    request = Request("POST", "/anomaly-score?k=256", _one_image(), {"content-type": "application/x-npy"})
    with live_server(digits_artifact, tmp_path, queue_limit=32, torch_threads=1, grace_period_s=GRACE_S,
                     log_level="info", processes=processes) as server:
        result, signalled_at = asyncio.run(_load_then_sigterm(server, request))
        try:
            code = server.process.wait(timeout=GRACE_S + 5.0)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {GRACE_S + 5} s after SIGTERM:\n{server.log_tail()}")
        exited_after = time.monotonic() - signalled_at
        log = server.log_text()

    outcomes = result.outcomes
    # The signal takes a moment to reach the server (with 2 processes the supervisor passes it on): a request
    # written in that moment may still be accepted, and then it must be served. Only requests sent before the
    # signal or well after it are held to one outcome (seen: one sent 0.0 ms after the signal, served 200).
    before = [o for o in outcomes if o.sent < signalled_at]
    in_transit = [o for o in outcomes if signalled_at <= o.sent < signalled_at + SIGNAL_DELIVERY_S]
    after = [o for o in outcomes if o.sent >= signalled_at + SIGNAL_DELIVERY_S]
    finished_in_drain = [o for o in before if o.status == 200 and o.sent + o.latency > signalled_at]
    print(f"\nsigterm: exit {code} after {exited_after:.2f} s; sent before {status_counts(before)}, "
          f"after {status_counts(after)}; {len(finished_in_drain)} accepted requests finished during the drain")

    def refused(o) -> bool:  # a 503 with Retry-After, or no connection at all (the listener is closed)
        return (o.status == 503 and o.retry_after is not None) or o.error == "ClientConnectorError"

    def unread(o) -> bool:  # no response: closed listener, or an idle connection closed as the request went out
        return o.error in ("ClientOSError", "ServerDisconnectedError")

    dropped = [o for o in before if not (o.status == 200 or refused(o))]
    dropped += [o for o in in_transit if not (o.status == 200 or refused(o) or unread(o))]
    dropped += [o for o in after if not (refused(o) or unread(o))]
    assert not dropped, [(round(o.sent - signalled_at, 3), o.status, o.code, o.error) for o in dropped[:20]]
    assert not any(o.status == 200 for o in after), "a request sent after SIGTERM was served"
    assert finished_in_drain, "no request was in flight at SIGTERM: the test did not test the drain"
    assert code == 0, log[-3000:]
    assert exited_after < GRACE_S, f"exit took {exited_after:.1f} s, grace period {GRACE_S} s"
    assert "timeout graceful shutdown exceeded" not in log
    assert "Traceback" not in log, log[-3000:]
