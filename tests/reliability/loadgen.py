"""A small, bounded asyncio load generator for the overload and shutdown checks (loopback only).

aiohttp rather than httpx: on this workload httpx's async client spends about 3 ms of CPU per request, aiohttp
about 0.15 ms, and a load generator that shares the machine with the server must stay cheap. Every request
becomes one ``Outcome``: its HTTP status and ``Retry-After`` when a response came back, or the
name of the transport error when none did. Open-loop load sends at a fixed rate whatever the server does (as
real clients do); ``max_in_flight`` bounds the generator itself, and requests it could not send because of that
bound are counted, never silently skipped.
"""

import asyncio
import json
import math
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import aiohttp


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    body: Optional[bytes] = None
    headers: Optional[Dict[str, str]] = None


@dataclass
class Outcome:
    sent: float  # time.monotonic() when the request was started
    latency: float  # seconds until the response (or the error)
    status: Optional[int] = None
    retry_after: Optional[str] = None
    code: Optional[str] = None  # the JSON error code, for error responses
    error: Optional[str] = None  # transport exception class name when no response came back

    @property
    def answered(self) -> bool:
        return self.status is not None


def session(url: str, *, max_connections: int, keep_alive: bool = True, timeout: float = 60.0) -> aiohttp.ClientSession:
    """A client session for ``url``; ``keep_alive=False`` opens a new connection for every request."""
    connector = aiohttp.TCPConnector(limit=max_connections, force_close=not keep_alive)
    return aiohttp.ClientSession(url, connector=connector, timeout=aiohttp.ClientTimeout(total=timeout))


async def one(client: aiohttp.ClientSession, request: Request) -> Outcome:
    started = time.monotonic()
    try:
        # No Content-Type given means none sent (aiohttp would add application/octet-stream).
        skip = () if "content-type" in {k.lower() for k in request.headers or {}} else ("Content-Type",)
        async with client.request(request.method, request.path, data=request.body, headers=request.headers,
                                  skip_auto_headers=skip) as response:
            body = await response.read()
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:  # refused, reset, timeout: no HTTP response
        return Outcome(started, time.monotonic() - started, error=type(exc).__name__)
    outcome = Outcome(started, time.monotonic() - started, response.status, response.headers.get("Retry-After"))
    if response.status >= 400 and response.content_type == "application/json":
        outcome.code = json.loads(body).get("error", {}).get("code")
    return outcome


async def closed_loop(client: aiohttp.ClientSession, request: Request, *, concurrency: int,
                      duration: float) -> List[Outcome]:
    """``concurrency`` workers, each sending its next request as soon as the last one is answered."""
    outcomes: List[Outcome] = []
    end = time.monotonic() + duration

    async def worker() -> None:
        while time.monotonic() < end:
            outcomes.append(await one(client, request))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return outcomes


async def open_loop(client: aiohttp.ClientSession, request: Request, *, rate: float, duration: float,
                    max_in_flight: int) -> "OpenLoopResult":
    """Start a request every ``1 / rate`` seconds for ``duration`` seconds, then wait for all of them."""
    tasks: List[asyncio.Task] = []
    in_flight = 0
    skipped = 0
    started = time.monotonic()

    async def tracked() -> Outcome:
        nonlocal in_flight
        try:
            return await one(client, request)
        finally:
            in_flight -= 1

    for i in range(int(rate * duration)):
        await asyncio.sleep(max(0.0, started + i / rate - time.monotonic()))  # on schedule, no drift
        if in_flight >= max_in_flight:
            skipped += 1
            continue
        in_flight += 1
        tasks.append(asyncio.create_task(tracked()))
    sent_for = time.monotonic() - started
    outcomes = list(await asyncio.gather(*tasks))
    return OpenLoopResult(outcomes, skipped, sent_for)


@dataclass
class OpenLoopResult:
    outcomes: List[Outcome]
    skipped: int  # not sent: the generator's own in-flight bound was reached (the server was not shedding)
    sent_for: float  # seconds the sending took (close to ``duration`` unless the generator fell behind)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile, q in [0, 100]."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100.0 * len(ordered)) - 1))]


def status_counts(outcomes: Sequence[Outcome]) -> Dict[str, int]:
    counts: Dict[str, int] = {}
    for o in outcomes:
        key = str(o.status) if o.answered else o.error
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


class RssSampler:
    """Samples a process's resident memory every ``interval`` seconds on a thread, while in a ``with``."""

    def __init__(self, read_mib: Callable[[], float], interval: float = 0.25) -> None:
        self._read, self._interval = read_mib, interval
        self.samples: List[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self._read())
            self._stop.wait(self._interval)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
