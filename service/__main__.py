"""``python -m service`` / ``vae-serve``: check the artifact, then serve it with uvicorn."""

import argparse
import logging
import signal
import sys
from typing import List, Optional

import uvicorn
from pydantic import ValidationError

from service.app import create_app
from service.config import Settings
from service.runtime import ArtifactError, ModelRuntime

log = logging.getLogger("service")


class _DrainingServer(uvicorn.Server):
    """On SIGTERM/SIGINT, readiness turns 503 before uvicorn stops accepting and drains in-flight requests."""

    def __init__(self, config: uvicorn.Config, state) -> None:
        super().__init__(config)
        self._state = state

    def run(self, sockets=None) -> None:
        # uvicorn re-raises the signal it caught once shutdown is done, which would turn a clean drain
        # into exit status 143; with no-op handlers restored instead, main() returns 0.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: None)
        super().run(sockets)

    def handle_exit(self, sig, frame) -> None:
        self._state.draining = True
        self._state.metrics.ready.set(0)
        super().handle_exit(sig, frame)


def parse_args(argv: Optional[List[str]]) -> dict:
    parser = argparse.ArgumentParser(prog="vae-serve", description=__doc__.split("\n")[0],
                                     epilog="Every option is also read from VAE_<NAME> environment variables.")
    parser.add_argument("--model", dest="model_path", help="path to the vae.ts artifact (VAE_MODEL_PATH)")
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    parser.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--max-batch-rows", type=int)
    parser.add_argument("--batch-delay-ms", type=float)
    parser.add_argument("--queue-limit", type=int)
    parser.add_argument("--log-level")
    args = parser.parse_args(argv)
    return {k: v for k, v in vars(args).items() if v is not None}


def main(argv: Optional[List[str]] = None) -> int:
    overrides = parse_args(argv)
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        print(f"vae-serve: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        runtime = ModelRuntime(settings.model_path, device=settings.device, buckets=settings.buckets,
                               max_score_decodes=settings.max_score_decodes, expected_sha256=settings.expected_sha256)
    except ArtifactError as exc:
        print(f"vae-serve: cannot serve this model: {exc}", file=sys.stderr)
        return 2
    log.info("loaded %s on %s (sha256 %s)", settings.model_path, runtime.device, runtime.info.sha256[:12])
    app = create_app(settings, runtime=runtime)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            timeout_graceful_shutdown=settings.grace_period_s, access_log=False)
    _DrainingServer(config, app.state.service).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
