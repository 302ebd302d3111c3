"""One server process: load and check the artifact, build the app, serve with uvicorn, drain on SIGTERM.

``python -m service`` runs it in its own process when it serves with one process, and in each child of the
supervisor (``service.supervisor``) otherwise, on the socket the supervisor bound.
"""

import logging
import signal
import socket
import sys
from pathlib import Path
from typing import Optional

import uvicorn

from service.app import create_app
from service.config import Settings
from service.core import reloading
from service.core.errors import REFUSED
from service.core.runtime import ArtifactError, ModelRuntime

log = logging.getLogger("service")


class DrainingServer(uvicorn.Server):
    """On SIGTERM/SIGINT, readiness turns 503 before uvicorn stops accepting and drains in-flight requests."""

    def __init__(self, config: uvicorn.Config, state) -> None:
        super().__init__(config)
        self._state = state

    def run(self, sockets=None) -> None:
        # uvicorn re-raises the signal it caught once shutdown is done, which would turn a clean drain
        # into exit status 143; with no-op handlers restored instead, the process exits 0.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: None)
        super().run(sockets)

    def handle_exit(self, sig, frame) -> None:
        self._state.draining = True
        self._state.metrics.set_ready(False)
        super().handle_exit(sig, frame)


def serve(settings: Settings, sock: Optional[socket.socket] = None) -> int:
    """Serve until SIGTERM; 0 after a clean drain, ``REFUSED`` (2) when the artifact cannot be served."""
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if hasattr(signal, "SIGHUP"):  # a reload asked for while this process still loads: it loads the current model
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # A process started after a reload (a replacement) serves the server's current model, not its first.
    current = reloading.read(settings.metrics_dir, reloading.CURRENT) if (settings.processes or 1) > 1 else None
    path, pin = (Path(current.path), current.sha256) if current else (settings.model_path, settings.expected_sha256)
    try:
        runtime = ModelRuntime(path, device=settings.device, buckets=settings.buckets,
                               max_score_decodes=settings.max_score_decodes, expected_sha256=pin)
    except ArtifactError as exc:
        print(f"vae-serve: cannot serve this model: {exc}", file=sys.stderr)
        return REFUSED
    log.info("loaded %s on %s (sha256 %s)", path, runtime.device, runtime.info.sha256[:12])
    app = create_app(settings, runtime=runtime)
    del runtime  # the app holds it; a reload must be able to release it
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            timeout_graceful_shutdown=settings.grace_period_s, access_log=False)
    DrainingServer(config, app.state.service).run(sockets=[sock] if sock is not None else None)
    return 0
