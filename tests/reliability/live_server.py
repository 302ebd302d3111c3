"""A real ``python -m service`` process on 127.0.0.1 for the reliability tests: start, wait until ready, stop.

Settings are passed the way an operator passes them, as ``VAE_*`` environment variables.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List

import httpx

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class LiveServer:
    url: str
    process: subprocess.Popen
    log: Path

    def pids(self) -> List[int]:
        """The server's processes: the one started, and with several server processes its children."""
        return [self.process.pid, *children(self.process.pid)]

    def rss_mib(self) -> float:
        """Resident memory of every server process together (VmRSS summed), in MiB."""
        return sum(_rss_kib(pid) for pid in self.pids()) / 1024.0

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_text()[-chars:]


@contextmanager
def live_server(artifact: Path, log_dir: Path, *, ready_timeout: float = 180.0, **settings) -> Iterator[LiveServer]:
    """Serve ``artifact`` on a free loopback port with ``VAE_<NAME>=value`` for each setting; killed on exit
    if the test has not stopped it itself."""
    port = free_port()
    log = log_dir / f"server-{port}.log"
    env = {**os.environ, **{f"VAE_{name.upper()}": str(value) for name, value in settings.items()}}
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "service", "--model", str(artifact), "--host", "127.0.0.1", "--port", str(port),
             "--device", "cpu"],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    server = LiveServer(f"http://127.0.0.1:{port}", process, log)
    try:
        _wait_ready(server, ready_timeout)
        yield server
    finally:
        try:  # the whole group: with several server processes, the supervisor's children too
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(timeout=30)


def children(pid: int) -> List[int]:
    """Direct children of ``pid`` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited while we looked
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return sorted(found)


def _rss_kib(pid: int) -> int:
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except FileNotFoundError:
        return 0  # exited while we looked
    return next((int(line.split()[1]) for line in lines if line.startswith("VmRSS:")), 0)


def _wait_ready(server: LiveServer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=server.url, timeout=5.0) as client:
        while True:
            if server.process.poll() is not None:
                raise RuntimeError(f"server exited with {server.process.returncode}:\n{server.log_tail()}")
            try:
                if client.get("/readyz").status_code == 200:
                    return
            except httpx.TransportError:
                pass  # not listening yet
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready after {timeout} s:\n{server.log_tail()}")
            time.sleep(0.1)
