"""One server under test: a subprocess in its own session on a loopback port, started, probed, stopped.

The whole process group is signalled on stop (LitServe forks workers), so nothing outlives a run.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[1]  # servers run as `python -m bench.servers.X` from here


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, body: Optional[bytes] = None, content_type: str = "",
         timeout: float = 30.0) -> Tuple[int, bytes]:
    headers = {"Content-Type": content_type} if content_type else {}
    req = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, b""


class ServerProcess:
    def __init__(self, name: str, args: List[str], port: int, log_path: Path, env: Dict[str, str],
                 ready_path: str = "/readyz", cwd: Path = ROOT) -> None:
        self.name, self.args, self.port, self.log_path, self.cwd = name, args, port, log_path, cwd
        self.env, self.ready_path = env, ready_path
        self.proc: Optional[subprocess.Popen] = None
        self.start_to_ready_s: Optional[float] = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 120.0) -> float:
        """Start and wait for ``ready_path`` to answer 200; returns seconds from spawn to ready."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        started = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, *self.args], stdout=log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **self.env}, cwd=self.cwd, start_new_session=True)
        log.close()
        while time.perf_counter() - started < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.log_path}")
            if http("GET", self.url + self.ready_path, timeout=2.0)[0] == 200:
                self.start_to_ready_s = time.perf_counter() - started
                return self.start_to_ready_s
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"{self.name} was not ready after {timeout_s:.0f} s; see {self.log_path}")

    def rss_mb(self) -> Dict[str, float]:
        """VmRSS of the main process, and summed over its process group (LitServe's workers)."""
        if self.proc is None:
            return {}
        main = _rss_kb(self.proc.pid)
        group = sum(_rss_kb(pid) for pid in _group(self.proc.pid))
        return {"main_mb": main / 1024.0, "group_mb": group / 1024.0}

    def cpu_seconds(self) -> Dict[int, float]:
        """CPU seconds so far (user + system, every thread) of each process in the server's process group."""
        if self.proc is None:
            return {}
        tick = os.sysconf("SC_CLK_TCK")
        out = {}
        for pid in _group(self.proc.pid):
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # the process ended meanwhile
                continue
            out[pid] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        return out

    def metrics(self) -> str:
        status, body = http("GET", self.url + "/metrics", timeout=5.0)
        return body.decode() if status == 200 else ""

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        pgid = self.proc.pid  # start_new_session: the group id is our child's pid
        for sig, wait in ((signal.SIGTERM, 25.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        deadline = time.monotonic() + 10.0  # forked workers may outlive the parent for a moment
        while time.monotonic() < deadline and _group(pgid):
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                break
            time.sleep(0.1)


def _rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _group(pgid: int) -> List[int]:
    """The live processes of process group ``pgid``."""
    return [pid for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()) if _pgid(pid) == pgid]


def _pgid(pid: int) -> int:
    try:
        return os.getpgid(pid)
    except OSError:
        return -1


def batch_stats(metrics_text: str) -> Dict[str, Tuple[float, float]]:
    """{kernel: (rows, calls)} from the service's vae_batch_rows histogram."""
    out: Dict[str, List[float]] = {}
    for line in metrics_text.splitlines():
        for suffix, idx in (("_sum{", 0), ("_count{", 1)):
            prefix = "vae_batch_rows" + suffix
            if line.startswith(prefix):
                kernel = line[len(prefix):].split('kernel="', 1)[1].split('"', 1)[0]
                out.setdefault(kernel, [0.0, 0.0])[idx] = float(line.rsplit(" ", 1)[1])
    return {k: (v[0], v[1]) for k, v in out.items()}


def read_json(path: Path) -> Dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
