"""``python -m bench``: our service against a naive FastAPI server, LitServe and the HTTP ceiling, side by side.

    .venv/bin/python -m bench --model runs/vae.ts --out bench-results/

The peers (LitServe) and tools come with the project's ``bench`` extra (``pip install -e '.[bench]'``, part
of ``dev``), or with ``--install``, which pip-installs that extra's list into this environment first. wrk
from Debian (``apt-get install wrk``) is the load generator when present. All traffic goes to 127.0.0.1, every
measurement is bounded by ``--duration`` and ``--max-requests``. Writes ``results.json`` (raw numbers) and
``results.md`` (the tables) to ``--out``. See bench/README.md.
"""

import argparse
import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

from bench.workloads import WORKLOADS


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    from bench.runner import SERVERS

    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="the vae.ts artifact every server loads")
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="results folder")
    parser.add_argument("--images", default="digits", help="digits | idx:DIR (MNIST-style IDX files)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads in every server")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per measurement")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of warm-up load per measurement")
    parser.add_argument("--max-requests", type=int, default=200_000, help="request cap per measurement")
    parser.add_argument("--servers", nargs="+", default=list(SERVERS), choices=SERVERS)
    parser.add_argument("--workloads", nargs="+", default=[w.name for w in WORKLOADS],
                        choices=[w.name for w in WORKLOADS])
    parser.add_argument("--open-loop", type=float, default=10.0, help="seconds of the half-load tail test (0: skip)")
    parser.add_argument("--cold-starts", type=int, default=3, help="cold starts of our service to time (0: skip)")
    parser.add_argument("--cold-start-model", type=Path, help="artifact for the cold starts (default: --model)")
    parser.add_argument("--profile", type=float, default=0.0, help="seconds of py-spy on ours at /encode c=64")
    parser.add_argument("--batch-delay-ms", type=float, default=0.0,
                        help="ours (VAE_BATCH_DELAY_MS) and LitServe's batch_timeout; 0 is both servers' default")
    parser.add_argument("--lit-workers", type=int, nargs="+", default=[1, 2],
                        help="LitServe's workers_per_device (processes): each count is run, the best one compared")
    parser.add_argument("--device", default="cpu",
                        help="every server's model device: cpu, or cuda on a GPU machine (LitServe's accelerator too)")
    parser.add_argument("--processes", type=int, default=0,
                        help="our server processes (VAE_PROCESSES; 0: the service's default); the ceiling runs as many")
    parser.add_argument("--lit-fast-queue", action="store_true", help="LitServe's ZeroMQ transport")
    parser.add_argument("--rounds", type=int, default=1, help="measure every server this many times, alternating; "
                        "report the best round (the least disturbed)")
    parser.add_argument("--variant", action="append", default=[], metavar="LABEL=DIR",
                        help="also run `python -m service` from another checkout DIR, reported as LABEL (A/B tests)")
    parser.add_argument("--install", action="store_true",
                        help="first pip install the project's bench extra (LitServe, aiohttp, py-spy) here")
    parser.add_argument("--no-install", action="store_true", help=argparse.SUPPRESS)  # the default now
    return parser.parse_args(argv)


def bench_requirements() -> List[str]:
    """The project's ``bench`` extra, as the installed distribution declares it."""
    marker = re.compile(r"""\s*;\s*extra\s*==\s*["']bench["']\s*$""")
    return [marker.sub("", r) for r in importlib.metadata.requires("vae-service") or [] if marker.search(r)]


def install() -> None:
    """pip install the benchmark's peers and tools into this interpreter's environment."""
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *bench_requirements()]
    subprocess.run(cmd, check=True)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if not args.model.is_file():
        print(f"python -m bench: no artifact at {args.model} (train one: python -m training --out {args.model})",
              file=sys.stderr)
        return 2
    variants = {}
    for item in args.variant:
        label, sep, folder = item.partition("=")
        if not sep or not (Path(folder) / "service").is_dir() or label in ("ours", "naive", "litserve", "ceiling"):
            print(f"python -m bench: --variant wants LABEL=DIR with DIR/service, got {item!r}", file=sys.stderr)
            return 2
        variants[label] = Path(folder).resolve()
    if args.install:
        install()
    from bench import profile, runner

    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")
    opts = runner.Options(
        model=args.model.resolve(), out=args.out.resolve(), images=args.images, threads=args.threads,
        duration_s=args.duration, warmup_s=args.warmup, max_requests=args.max_requests, servers=args.servers,
        workloads=args.workloads, open_loop_s=args.open_loop, cold_starts=args.cold_starts,
        cold_start_model=args.cold_start_model.resolve() if args.cold_start_model else None,
        profile_s=args.profile, lit_fast_queue=args.lit_fast_queue, batch_delay_ms=args.batch_delay_ms,
        lit_workers=args.lit_workers, processes=args.processes, device=args.device, rounds=args.rounds,
        variants=variants, inprocess_s=args.duration,
    )
    results = runner.run(opts)
    print((args.out / "results.md").read_text())
    if "profile" in results.get("ours", {}):
        print(profile.render(results["ours"]["profile"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
