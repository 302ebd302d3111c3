"""Where our service spends its CPU under load: py-spy samples every thread while wrk drives a workload.

``record`` writes py-spy's raw collapsed stacks (``profile/ours.{cpu,gil}.raw.txt``, one line per distinct
stack with its sample count; open them with speedscope or flamegraph.pl) and returns a summary: per thread
(event loop, model worker, thread-pool workers) its share of the samples, and per thread the samples
attributed to the innermost frame that belongs to a known category (PNG decode, multipart parsing, JSON,
middleware, ...). Idle samples (a thread waiting in epoll, on a lock or a queue) are left out.
"""

import re
import shutil
import subprocess
import sys
import threading
from collections import Counter, defaultdict
from pathlib import Path
from typing import Dict, List, Tuple

from bench import loadgen

# Innermost frame first wins: the first category whose pattern matches a frame, scanning leaf to root.
CATEGORIES: List[Tuple[str, str]] = [
    ("model (torch)", r"torch/|\(torch|runtime\.py:.*(encode|decode|score|_split_on_oom)|jit"),
    ("PNG decode (Pillow)", r"PIL/|codecs\.py:.*decode_image|_to_mode"),
    ("npy decode", r"codecs\.py:.*(decode_npy|_read_npy)|numpy/lib/format"),
    ("JSON encode (orjson, tolist)", r"responses\.py:.*render|orjson|tolist"),
    ("multipart parsing", r"multipart/|formparsers|datastructures\.py|form \(starlette"),
    ("prometheus metrics", r"prometheus_client/"),
    ("our middleware", r"service/middleware\.py"),
    ("batcher", r"service/batching\.py"),
    ("routes and deps (service)", r"service/(routes|deps|inputs|errors)"),
    ("FastAPI routing, validation, deps", r"fastapi/"),
    ("starlette (routing, requests, responses)", r"starlette/"),
    ("uvicorn HTTP protocol", r"uvicorn/|httptools"),
    ("thread handoff (anyio, concurrent.futures)", r"anyio/|concurrent/futures|threading\.py"),
    ("uvloop (C: sockets, callbacks)", r"Runner\.run \(asyncio/runners\.py"),
    ("asyncio", r"asyncio/|uvloop"),
]
_COMPILED = [(name, re.compile(p)) for name, p in CATEGORIES]
_IDLE = re.compile(r"Condition\.wait|Queue\.get \(queue\.py|_worker \(concurrent/futures/thread\.py|select \(selectors")


def record(server, req: loadgen.Request, connections: int, seconds: float, outdir: Path, rate: int = 250) -> Dict:
    """Profile ``server`` (a started ServerProcess) while wrk sends ``req`` at ``connections``, twice: all
    running threads ("cpu"), then only the thread holding the GIL ("gil": where Python itself spends time)."""
    spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if spy is None:
        return {"error": "py-spy is not installed (pip install py-spy)"}
    outdir.mkdir(parents=True, exist_ok=True)
    out: Dict = {}
    for mode in ("cpu", "gil"):
        raw = outdir / f"ours.{mode}.raw.txt"
        load = threading.Thread(target=loadgen.wrk, args=(server.url, req, connections, seconds + 2, 10**9,
                                                          outdir / "work"))
        load.start()
        cmd = [spy, "record", "--pid", str(server.proc.pid), "--duration", str(int(seconds)), "--rate", str(rate),
               "--format", "raw", "--threads", "--nonblocking", "--subprocesses", "--output", str(raw)] + (["--gil"] if mode == "gil" else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        load.join()
        if proc.returncode != 0 or not raw.exists():
            return {"error": f"py-spy failed: {proc.stderr.strip()[-500:]}"}
        out[mode] = summarize(raw.read_text())
        out[mode]["raw"] = f"profile/{raw.name}"  # beside results.json, wherever --out puts it
    return out


def summarize(text: str) -> Dict:
    by_thread: Dict[str, Counter] = defaultdict(Counter)
    frames_by_thread: Dict[str, Counter] = defaultdict(Counter)
    totals: Counter = Counter()
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        if _IDLE.search(frames[-1]):
            continue  # waiting (py-spy's idle detection misses some waits under --nonblocking)
        thread = _role(frames)
        n = int(count)
        totals[thread] += n
        by_thread[thread][_category(frames)] += n
        frames_by_thread[thread][frames[-1]] += n
    total = sum(totals.values()) or 1
    return {
        "samples": total,
        "threads": {t: {"share": c / total, "categories": {k: v / total for k, v in by_thread[t].most_common()},
                        "top_leaf_frames": [(f, v / total) for f, v in frames_by_thread[t].most_common(12)]}
                    for t, c in totals.most_common()},
    }


def _role(frames: List[str]) -> str:
    """The thread's job, from the name py-spy prints first ("thread (tid): name")."""
    name = frames[0]
    if "MainThread" in name:
        return "event loop"
    if "model-worker" in name:
        return "model worker"
    if "AnyIO worker" in name or "ThreadPoolExecutor" in name:
        return "thread pool (anyio)"
    return "other"


def _category(frames: List[str]) -> str:
    for frame in reversed(frames):  # leaf first
        for name, pattern in _COMPILED:
            if pattern.search(frame):
                return name
    return "other Python"


def render(profiles: Dict) -> str:
    """A short text table of each mode's summary."""
    if "error" in profiles:
        return profiles["error"]
    lines = []
    for mode, summary in profiles.items():
        what = "threads running (idle excluded)" if mode == "cpu" else "the thread holding the GIL"
        lines.append(f"[{mode}] {summary['samples']} samples of {what}")
        for thread, info in summary["threads"].items():
            lines.append(f"  {thread}: {100 * info['share']:.1f}% of samples")
            for name, share in info["categories"].items():
                lines.append(f"      {100 * share:5.1f}%  {name}")
    return "\n".join(lines)
