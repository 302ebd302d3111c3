"""Overload: a real server offered about 4x its measured capacity for 30 s sheds the excess and stays healthy.

Each workload: measure capacity (closed loop, 16 workers, 5 s), then 30 s of open-loop arrivals at 4x that
rate, then the same sequential probe as before the load. For both: only 200/429/503, every 503 with a
Retry-After of whole seconds, every request answered, resident memory bounded and not still growing at the
end, and a lone request as fast after the load as before it.

Two workloads, because a server has two ways to be the bottleneck:

- ``model``: anomaly scores with K=256, where the model worker is the bottleneck. The bounded per-kernel queue
  must shed the excess at once: requests in flight never reach the generator's bound, and the server still
  completes at least half its capacity (no congestion collapse).
- ``http``: one-row /encode, where the model is cheap and the event loop is the bottleneck. The batcher's
  queue rarely fills, so most of the excess waits in the event loop instead of being refused; the generator's
  in-flight bound is reached and goodput drops. Reported, not asserted: refusing earlier (an in-flight limit
  before the body is read) costs event-loop time too, and on a 2-core machine shared with the generator
  4x of an event-loop-bound capacity cannot all be refused in time.

Run ``pytest -m slow tests/reliability/test_overload.py -s`` to see the measured numbers.
"""

import asyncio
import io
import statistics
from pathlib import Path

import numpy as np
import pytest

from tests.reliability.live_server import live_server
from tests.reliability.loadgen import Request, RssSampler, closed_loop, one, open_loop, percentile, session, status_counts

pytestmark = pytest.mark.slow

QUEUE_LIMIT = 32  # rows per kernel queue: small, so that the excess is shed rather than queued
OVERLOAD = 4.0  # offered rate / measured capacity
DURATION_S = 30.0
# The generator's own bound on requests in flight. A server that sheds answers the excess at once, so its
# in-flight requests stay near QUEUE_LIMIT; one that does not lets them pile up to this bound.
MAX_IN_FLIGHT = 256
RSS_GROWTH_MIB = 256  # peak resident memory under overload minus the idle server's, at most
# One server process with one model worker: this test is about how one process's bounded queue sheds, and the
# load generator runs on this same 2-core machine. With the defaults (two processes, or two workers) the model
# takes both cores, 4x its capacity is a rate the generator and the event loops must share them for, and the
# test measures that contention instead. Measured: two processes, 40 of 20,072 requests waited for the
# generator's in-flight bound; one process with two workers, capacity 150 req/s and goodput 63 under 4x
# (the same 63 as before exact-size calls raised the capacity from 90); one worker, 93 and 83.
SETTINGS = dict(queue_limit=QUEUE_LIMIT, torch_threads=1, log_level="warning", processes=1, model_workers=1)


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


ONE_IMAGE = _npy(np.random.default_rng(0).integers(0, 256, size=(1, 1, 8, 8), dtype=np.uint8))
WORKLOADS = {  # name: (request, whether the model is the bottleneck)
    "model": (Request("POST", "/anomaly-score?k=256", ONE_IMAGE, {"content-type": "application/x-npy"}), True),
    "http": (Request("POST", "/encode", ONE_IMAGE, {"content-type": "application/x-npy"}), False),
}


async def _probe_p50(client, request: Request, n: int = 40) -> float:
    outcomes = [await one(client, request) for _ in range(n)]
    assert all(o.status == 200 for o in outcomes), status_counts(outcomes)
    return percentile([o.latency for o in outcomes], 50)


async def _overload(server, request: Request) -> dict:
    async with session(server.url, max_connections=MAX_IN_FLIGHT) as client:
        p50_before = await _probe_p50(client, request)
        measured = await closed_loop(client, request, concurrency=16, duration=5.0)
        assert all(o.status == 200 for o in measured), status_counts(measured)
        capacity = len(measured) / 5.0
        rss_idle = server.rss_mib()
        with RssSampler(server.rss_mib) as rss:
            result = await open_loop(client, request, rate=OVERLOAD * capacity, duration=DURATION_S,
                                     max_in_flight=MAX_IN_FLIGHT)
        await asyncio.sleep(1.0)
        p50_after = await _probe_p50(client, request)
    outcomes = result.outcomes
    ok = [o.latency for o in outcomes if o.status == 200]
    shed = [o.latency for o in outcomes if o.status in (429, 503)]
    third = len(rss.samples) // 3
    return {
        "capacity_rps": capacity, "offered_rps": OVERLOAD * capacity, "sent": len(outcomes),
        "not_sent_in_flight_bound": result.skipped, "statuses": status_counts(outcomes),
        "codes": {c: sum(o.code == c for o in outcomes) for c in sorted({o.code for o in outcomes if o.code})},
        "goodput_rps": len(ok) / DURATION_S,
        "ok_p50_ms": 1e3 * percentile(ok, 50), "ok_p99_ms": 1e3 * percentile(ok, 99),
        "shed_p50_ms": 1e3 * percentile(shed, 50), "shed_p99_ms": 1e3 * percentile(shed, 99),
        "retry_after": sorted({o.retry_after for o in outcomes if o.status in (429, 503)}, key=str),
        "missing_retry_after": sum(1 for o in outcomes if o.status in (429, 503) and not o.retry_after),
        "rss_idle_mib": rss_idle, "rss_peak_mib": max(rss.samples),
        # Under load RSS swings by +-60 MiB from one sample to the next; medians show a trend, peaks do not.
        "rss_median_middle_third_mib": statistics.median(rss.samples[third:2 * third] or rss.samples),
        "rss_median_last_third_mib": statistics.median(rss.samples[2 * third:]),
        "p50_before_ms": 1e3 * p50_before, "p50_after_ms": 1e3 * p50_after,
        "outcomes": outcomes,
    }


@pytest.mark.parametrize("workload", sorted(WORKLOADS))
def test_overload_sheds_with_retry_after_and_recovers(workload, digits_artifact: Path, tmp_path: Path):
    request, model_bound = WORKLOADS[workload]
    with live_server(digits_artifact, tmp_path, **SETTINGS) as server:
        report = asyncio.run(_overload(server, request))
        assert server.process.poll() is None, server.log_tail()
    outcomes = report.pop("outcomes")
    print(f"\noverload[{workload}]:", {k: round(v, 1) if isinstance(v, float) else v for k, v in report.items()})

    unanswered = [o for o in outcomes if not o.answered]
    assert not unanswered, f"{len(unanswered)} requests got no response: {status_counts(unanswered)}"
    assert set(report["statuses"]) <= {"200", "429", "503"}, report["statuses"]
    assert report["missing_retry_after"] == 0
    assert all(ra.isdigit() and int(ra) >= 1 for ra in report["retry_after"]), report["retry_after"]
    if model_bound:
        assert "503" in report["statuses"] or "429" in report["statuses"], "4x capacity was never shed"
        # Shedding means the excess is answered at once: requests in flight never reach the generator's bound.
        assert report["not_sent_in_flight_bound"] == 0, (
            f"{report['not_sent_in_flight_bound']} requests could not be sent: {MAX_IN_FLIGHT} were already in "
            f"flight, so the server queued the excess instead of refusing it (shed p50 {report['shed_p50_ms']:.0f} ms)"
        )
        # No congestion collapse: under overload the server still completes at least half its capacity.
        assert report["goodput_rps"] >= 0.5 * report["capacity_rps"], report
    assert report["rss_peak_mib"] - report["rss_idle_mib"] <= RSS_GROWTH_MIB, report
    assert report["rss_median_last_third_mib"] <= report["rss_median_middle_third_mib"] + 48, "RSS still growing"
    # Recovery: one second after the load, a lone request is about as fast as before it.
    assert report["p50_after_ms"] <= max(2.0 * report["p50_before_ms"], report["p50_before_ms"] + 30.0), report
