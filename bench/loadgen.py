"""Load generators: wrk (closed loop, C + LuaJIT, the light one) and an aiohttp open-loop generator.

Both send to 127.0.0.1 only and stop by themselves: after ``duration_s`` seconds or ``max_requests``
responses, whichever comes first. Closed loop (``wrk``): ``connections`` requests always in flight, the
throughput test. Open loop (``open_loop``): requests start on a fixed Poisson schedule whatever the server
does, and latency counts from the scheduled start (no coordinated omission), the tail-latency test.
"""

import asyncio
import json
import math
import random
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence

MARKER = "BENCH_JSON "

# Per thread: time of the first request and the last response (CLOCK_MONOTONIC via LuaJIT's FFI), so the
# rate is right even when the request cap stops a thread before wrk's -d runs out.
_LUA = r"""
local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
int clock_gettime(int clk_id, bench_timespec *tp);
]]
local ts = ffi.new("bench_timespec")
local function now_us() ffi.C.clock_gettime(1, ts); return tonumber(ts.tv_sec) * 1e6 + tonumber(ts.tv_nsec) / 1e3 end

local bodies, method, path, ctype, limit = {BODIES}, "{METHOD}", "{PATH}", "{CTYPE}", {LIMIT}
local reqs, threads, i, n, t0 = {}, {}, 0, 0, nil

function setup(thread) table.insert(threads, thread) end

function init(args)
  for k, p in ipairs(bodies) do
    local f = assert(io.open(p, "rb")); local b = f:read("*all"); f:close()
    reqs[k] = wrk.format(method, path, {["Content-Type"] = ctype}, b)
  end
  if #reqs == 0 then reqs[1] = wrk.format(method, path) end
end

function request()
  if not t0 then t0 = now_us(); wrk.thread:set("t0", t0) end
  i = i % #reqs + 1
  return reqs[i]
end

function response(status, headers, body)
  n = n + 1
  wrk.thread:set("n", n); wrk.thread:set("t1", now_us())
  if status >= 400 then wrk.thread:set("bad", (wrk.thread:get("bad") or 0) + 1) end
  if n >= limit then wrk.thread:stop() end
end

function done(summary, latency, requests)
  local n, bad, t0, t1 = 0, 0, math.huge, 0
  for _, t in ipairs(threads) do
    n = n + (t:get("n") or 0); bad = bad + (t:get("bad") or 0)
    t0 = math.min(t0, t:get("t0") or math.huge); t1 = math.max(t1, t:get("t1") or 0)
  end
  local e = summary.errors
  io.write(string.format('%s{"responses":%d,"bad_status":%d,"elapsed_us":%.0f,"socket_errors":%d,' ..
    '"timeouts":%d,"p50_us":%d,"p90_us":%d,"p95_us":%d,"p99_us":%d,"max_us":%d,"mean_us":%.1f}\n',
    "{MARKER}", n, bad, t1 - t0, e.connect + e.read + e.write, e.timeout, latency:percentile(50),
    latency:percentile(90), latency:percentile(95), latency:percentile(99), latency.max, latency.mean))
end
"""


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    bodies: Sequence[bytes]  # cycled through, one per request
    content_type: str = ""
    rows: int = 1  # images (or samples) per request


def have_wrk() -> bool:
    return shutil.which("wrk") is not None


def wrk(base_url: str, req: Request, connections: int, duration_s: float, max_requests: int, workdir: Path,
        timeout_s: float = 30.0) -> Dict:
    """Closed-loop run; returns responses, rate, latency percentiles (ms) and error counts."""
    assert base_url.startswith("http://127.0.0.1:"), f"loopback only, got {base_url}"
    workdir.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, body in enumerate(req.bodies):
        paths.append(workdir / f"body{k}.bin")
        paths[-1].write_bytes(body)
    script = (_LUA.replace("{BODIES}", "{" + ", ".join(json.dumps(str(p)) for p in paths) + "}")
              .replace("{METHOD}", req.method).replace("{PATH}", req.path).replace("{CTYPE}", req.content_type)
              .replace("{LIMIT}", str(max(1, max_requests))).replace("{MARKER}", MARKER))
    (workdir / "load.lua").write_text(script)
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, math.ceil(duration_s))}s", f"--timeout={int(timeout_s)}s",
           "-s", str(workdir / "load.lua"), base_url]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=duration_s + timeout_s + 30)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith(MARKER)), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout[-500:]}")
    raw = json.loads(line[len(MARKER):])
    elapsed = raw["elapsed_us"] / 1e6 if raw["responses"] else duration_s  # no response: no timestamps
    return _summary(raw["responses"], elapsed, req.rows,
                    {p: raw[f"p{p}_us"] / 1000.0 for p in (50, 90, 95, 99)}, raw["max_us"] / 1000.0,
                    errors={"status": raw["bad_status"], "socket": raw["socket_errors"], "timeout": raw["timeouts"]},
                    generator="wrk")


def closed_loop(base_url: str, req: Request, connections: int, duration_s: float, max_requests: int) -> Dict:
    """The same test as ``wrk`` in Python (aiohttp), for machines without wrk. Costs far more client CPU."""
    return asyncio.run(_run(base_url, req, duration_s, max_requests, connections=connections))


def open_loop(base_url: str, req: Request, rate: float, duration_s: float, max_requests: int,
              seed: int = 0) -> Dict:
    """Poisson arrivals at ``rate`` req/s; latency from each request's scheduled start."""
    return asyncio.run(_run(base_url, req, duration_s, max_requests, rate=rate, seed=seed))


async def _run(base_url: str, req: Request, duration_s: float, max_requests: int, connections: int = 0,
               rate: float = 0.0, seed: int = 0) -> Dict:
    import aiohttp

    assert base_url.startswith("http://127.0.0.1:"), f"loopback only, got {base_url}"
    latencies: List[float] = []
    errors = {"status": 0, "socket": 0, "timeout": 0}
    headers = {"Content-Type": req.content_type} if req.content_type else {}
    limit = connections or 1024
    connector = aiohttp.TCPConnector(limit=limit)
    timeout = aiohttp.ClientTimeout(total=30)
    cpu_started = time.process_time()  # the generator's own CPU: on 2 cores it competes with the server
    async with aiohttp.ClientSession(base_url, connector=connector, timeout=timeout) as session:
        started = time.perf_counter()
        deadline = started + duration_s

        async def one(k: int, scheduled: float) -> None:
            try:
                async with session.request(req.method, req.path, data=req.bodies[k % len(req.bodies)] if req.bodies
                                           else None, headers=headers) as resp:
                    await resp.read()
                    if resp.status >= 400:
                        errors["status"] += 1
                latencies.append(time.perf_counter() - scheduled)
            except asyncio.TimeoutError:
                errors["timeout"] += 1
            except aiohttp.ClientError:
                errors["socket"] += 1

        if rate:
            rng, tasks, at = random.Random(seed), [], started
            for k in range(max_requests):
                at += rng.expovariate(rate)
                if at > deadline:
                    break
                await asyncio.sleep(max(0.0, at - time.perf_counter()))
                tasks.append(asyncio.ensure_future(one(k, at)))
            await asyncio.gather(*tasks)
        else:
            counter = iter(range(max_requests))

            async def worker() -> None:
                for k in counter:
                    if time.perf_counter() > deadline:
                        return
                    await one(k, time.perf_counter())

            await asyncio.gather(*(worker() for _ in range(connections)))
        elapsed = time.perf_counter() - started
    ms = sorted(x * 1000.0 for x in latencies)
    pct = {p: ms[min(len(ms) - 1, int(math.ceil(p / 100.0 * len(ms))) - 1)] if ms else math.nan for p in (50, 90, 95, 99)}
    out = _summary(len(ms), elapsed, req.rows, pct, ms[-1] if ms else math.nan, errors,
                   generator="aiohttp-open" if rate else "aiohttp")
    out["generator_cores"] = (time.process_time() - cpu_started) / elapsed if elapsed > 0 else math.nan
    if rate:
        out["offered_rate"] = rate
    return out


def _summary(responses: int, elapsed_s: float, rows: int, pct: Dict[int, float], max_ms: float,
             errors: Dict[str, int], generator: str) -> Dict:
    rps = responses / elapsed_s if elapsed_s > 0 else 0.0
    return {"generator": generator, "responses": responses, "elapsed_s": round(elapsed_s, 3), "req_per_s": rps,
            "images_per_s": rps * rows, **{f"p{p}_ms": v for p, v in pct.items()}, "max_ms": max_ms,
            "errors": errors, "error_count": sum(errors.values())}
