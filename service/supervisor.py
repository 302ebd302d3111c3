"""Several server processes behind one port: a small supervisor, and readiness shared between the processes.

One Python process is bound by one GIL: HTTP parsing, routing, JSON and the batcher's bookkeeping of every
request run on it, and torch releases it only inside kernels. So the server runs ``processes`` full replicas
(each with its own model, batcher and model threads) that accept on one listening socket the supervisor bound,
and still presents one server: one port; ``/readyz`` 200 only when every process is warm; one ``/metrics``
scrape summing every process (prometheus-client's multiprocess mode, ``PROMETHEUS_MULTIPROC_DIR``).

Why replicas and not HTTP processes in front of one model process: on CPU every core must run model code too,
so the other shape needs a model process per core anyway plus a copy of every request between processes;
replicas share nothing, so a dead process takes only its own in-flight requests with it. On one GPU one process
(one CUDA context, large batches) stays the default.

The supervisor follows uvicorn's ``supervisors/multiprocess.py``: spawned children, a dead child is replaced
(and its live gauges removed, so it no longer counts as ready), SIGTERM or SIGINT is passed to every child,
each of which drains its accepted requests within the grace period, and the supervisor exits 0. A child that
exits with status 2 refused the artifact or its settings: a replacement would fail the same way, so the
supervisor stops and exits 2.
"""

import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Callable, List, Optional, Set

from service.core.errors import REFUSED

log = logging.getLogger(__name__)

RESPAWN_DELAY_S = 0.5  # between a process's death and its replacement


class Supervisor:
    """Runs ``count`` children of ``target(sock)`` on one listening socket until SIGTERM / SIGINT."""

    def __init__(self, target: Callable[[socket.socket], None], sock: socket.socket, count: int, *,
                 grace_s: float, metrics_dir: Path, reload_request: Optional[Callable[[], None]] = None) -> None:
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        self.target, self.sock, self.count = target, sock, count
        self.grace_s, self.metrics_dir = grace_s, metrics_dir
        self.reload_request = reload_request  # records what a SIGHUP to the server asks its processes to load
        self.children: List[multiprocessing.Process] = []
        self.stop = threading.Event()
        self.status = 0
        self.pending: Set[int] = set()  # reload signals received, passed on by the loop

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop.set())
        # SIGHUP (from outside): reload the configured model; SIGUSR1 (from a server process that took a reload
        # over HTTP and recorded what to load): pass it on. Either way every server process gets SIGHUP.
        for sig in (signal.SIGHUP, signal.SIGUSR1):
            signal.signal(sig, lambda number, _: self.pending.add(number))
        log.info("supervisor %d: starting %d server processes", os.getpid(), self.count)
        self.children = [self._spawn() for _ in range(self.count)]
        while not self.stop.wait(0.2):
            self._pass_on_reloads()
            self._replace_dead()
        self._shut_down()
        return self.status

    def _pass_on_reloads(self) -> None:
        while self.pending:
            number = self.pending.pop()
            if number == signal.SIGHUP and self.reload_request is not None:
                self.reload_request()
            log.info("supervisor %d: passing a reload on to %d server processes", os.getpid(), len(self.children))
            for child in self.children:
                if child.is_alive():
                    os.kill(child.pid, signal.SIGHUP)

    def _spawn(self) -> multiprocessing.Process:
        child = multiprocessing.get_context("spawn").Process(target=self.target, args=(self.sock,), daemon=False)
        child.start()
        return child

    def _replace_dead(self) -> None:
        from prometheus_client import multiprocess

        for i, child in enumerate(self.children):
            if child.is_alive():
                continue
            multiprocess.mark_process_dead(child.pid, str(self.metrics_dir))  # its live gauges stop counting
            if child.exitcode == REFUSED:
                log.error("server process %d refused to start (status %d); stopping", child.pid, child.exitcode)
                self.status = REFUSED
                self.stop.set()
                return
            log.warning("server process %d died (status %s); starting a replacement", child.pid, child.exitcode)
            if self.stop.wait(RESPAWN_DELAY_S):  # a process that dies at once would otherwise spin the CPU
                return
            self.children[i] = self._spawn()

    def _shut_down(self) -> None:
        """SIGTERM to every child; each drains within the grace period; then kill what is left."""
        self.sock.close()  # the children hold their own copies until they finish draining
        for child in self.children:
            if child.is_alive():
                os.kill(child.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s + 5.0
        for child in self.children:
            child.join(max(0.0, deadline - time.monotonic()))
            if child.is_alive():
                log.error("server process %d did not stop within the grace period; killing it", child.pid)
                child.kill()
                child.join()
            elif child.exitcode == REFUSED and self.status == 0:
                self.status = REFUSED
        log.info("supervisor %d: every server process stopped", os.getpid())


def serve_child(settings, sock: socket.socket) -> None:
    """A supervisor's child: one server process (``service.server``) on the shared socket; its exit status is
    serve's. Imported here, in the child, so the supervisor never loads torch or the app."""
    import sys

    _die_with_parent()
    from service.server import serve

    sys.exit(serve(settings, sock))


def _die_with_parent() -> None:
    """Ask Linux to send this process SIGTERM (a drain) when the supervisor dies, even by SIGKILL, so that no
    orphaned server keeps the port. Elsewhere a no-op: the supervisor still stops its children on exit."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    except (OSError, AttributeError):
        pass
    if os.getppid() == 1:  # the supervisor died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def bind(host: str, port: int) -> socket.socket:
    """The one listening socket every server process accepts on (as uvicorn binds it for its workers)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


__all__ = ["Supervisor", "bind", "serve_child"]
