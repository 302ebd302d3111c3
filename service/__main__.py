"""``python -m service`` / ``vae-serve``: serve the artifact, in one process or in several behind one port.

The supervisor of several processes (``service.supervisor``) imports neither torch nor the app: each child
loads the model itself (``service.server``).
"""

import argparse
import sys
import tempfile
from functools import partial
from pathlib import Path
from typing import List, Optional

from pydantic import ValidationError

from service.config import Settings


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
    parser.add_argument("--processes", type=int, help="server processes behind the port (VAE_PROCESSES)")
    parser.add_argument("--allow-reload", action="store_true", default=None,
                        help="allow POST /v1/model/reload and SIGHUP to replace the model in place (VAE_ALLOW_RELOAD)")
    parser.add_argument("--model-dir", type=Path,
                        help="the folder reloads may load from (VAE_MODEL_DIR; default: the model's folder)")
    args = parser.parse_args(argv)
    return {k: v for k, v in vars(args).items() if v is not None}


def main(argv: Optional[List[str]] = None) -> int:
    overrides = parse_args(argv)
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        print(f"vae-serve: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    if settings.server_processes() == 1:
        from service.server import serve

        return serve(settings)
    return _supervise(settings)


def _supervise(settings: Settings) -> int:
    import logging
    import os

    from service import supervisor
    from service.core import reloading

    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with tempfile.TemporaryDirectory(prefix="vae-metrics-") as metrics_dir:
        # prometheus-client's multiprocess mode: every child writes its values here and /metrics sums them.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
        count = settings.server_processes()
        child_settings = settings.model_copy(update={"metrics_dir": Path(metrics_dir), "processes": count})
        sock = supervisor.bind(settings.host, settings.port)
        # SIGHUP reloads the configured model: recorded for the processes before they are signalled.
        request = partial(reloading.write, Path(metrics_dir), reloading.REQUEST,
                          reloading.ModelFile(str(settings.model_path.resolve())))
        return supervisor.Supervisor(partial(supervisor.serve_child, child_settings), sock, count,
                                     grace_s=settings.grace_period_s, metrics_dir=Path(metrics_dir),
                                     reload_request=request).run()


if __name__ == "__main__":
    sys.exit(main())
