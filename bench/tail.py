"""Where the half-load tail comes from: one or more checkouts of the service under the same Poisson open loop,
alternating in rounds, with what the server did meanwhile (CPU of each process, rows per model call, wall time
per call, queue wait) beside the latencies, and the same server's /encode c=1 p50 and c=64 rate.

    python -m bench.tail --model vae28.ts --images idx:DIR --rate 950 --rounds 3 inline=/tmp/other-checkout

``ours`` (this checkout) always runs; every LABEL=DIR is another checkout (``python -m bench --variant``'s
A/B). Rounds alternate the servers, and every round is printed: on a shared 2-core machine the open loop's
p99 moves by 2-4x between rounds of the same code, so one round says little. Only 127.0.0.1 is contacted.
"""

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Dict, List

from bench import common, loadgen, runner
from bench.serverproc import ServerProcess
from bench.workloads import WORKLOADS, build_request, load_images

ENCODE = 'kernel="encode"'


def encode_histograms(metrics_text: str) -> Dict[str, float]:
    """Sums and counts of the encode kernel's histograms (rows per call, model seconds, queue wait)."""
    out: Dict[str, float] = {}
    for line in metrics_text.splitlines():
        name = line.split("{", 1)[0]
        if ENCODE in line and name.endswith(("_sum", "_count")):
            out[name] = float(line.rsplit(" ", 1)[1])
    return out


def measure(server: ServerProcess, req: loadgen.Request, rate: float, seconds: float, opts: runner.Options) -> Dict:
    work = opts.out / "work"
    runner.closed_loop(server, req, 64, opts.warmup_s, opts, work)
    c1 = runner.closed_loop(server, req, 1, opts.duration_s, opts, work)
    c64 = runner.closed_loop(server, req, 64, opts.duration_s, opts, work)
    before, cpu0, started = encode_histograms(server.metrics()), server.cpu_seconds(), time.perf_counter()
    loop = loadgen.open_loop(server.url, req, rate, seconds, int(rate * seconds) + 1)
    elapsed = time.perf_counter() - started
    after, cpu1 = encode_histograms(server.metrics()), server.cpu_seconds()
    delta = {name: after.get(name, 0.0) - before.get(name, 0.0) for name in after}
    calls = delta.get("vae_batch_rows_count", 0.0)
    waits = delta.get("vae_queue_wait_seconds_count", 0.0)
    return {
        "c1_p50_ms": c1["p50_ms"], "c64_req_per_s": c64["req_per_s"],
        "open_loop": {key: loop[key] for key in ("req_per_s", "p50_ms", "p90_ms", "p99_ms", "error_count",
                                                   "generator_cores")},
        "rows_per_call": delta.get("vae_batch_rows_sum", 0.0) / calls if calls else None,
        "calls_per_s": calls / elapsed,
        "model_ms_per_call": 1e3 * delta.get("vae_model_seconds_sum", 0.0) / calls if calls else None,
        "queue_wait_ms": 1e3 * delta.get("vae_queue_wait_seconds_sum", 0.0) / waits if waits else None,
        "process_cores": sorted(round((cpu1[p] - cpu0.get(p, 0.0)) / elapsed, 2) for p in cpu1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.tail", description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--images", default="digits", help="digits | idx:DIR (MNIST-style IDX files)")
    parser.add_argument("--rate", type=float, required=True, help="open-loop arrivals per second")
    parser.add_argument("--seconds", type=float, default=6.0, help="length of the open loop")
    parser.add_argument("--duration", type=float, default=4.0, help="seconds of each closed-loop measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--processes", type=int, default=0, help="our server processes (0: the default)")
    parser.add_argument("--out", type=Path, default=Path("bench-results/tail"))
    parser.add_argument("variants", nargs="*", metavar="LABEL=DIR", help="other checkouts of the service")
    args = parser.parse_args()
    variants = {label: Path(root) for label, root in (v.split("=", 1) for v in args.variants)}
    processes = args.processes or common.default_processes("cpu")  # as `python -m bench` resolves 0
    opts = runner.Options(model=args.model, out=args.out, images=args.images, duration_s=args.duration,
                          processes=processes, variants=variants)
    args.out.mkdir(parents=True, exist_ok=True)
    shape = common.model_shape(common.read_metadata(args.model))
    req = build_request(next(w for w in WORKLOADS if w.name == "encode_c64"), load_images(args.images), shape)
    results: Dict[str, List[Dict]] = {}
    print(f"load average before: {os.getloadavg()[0]:.2f}", flush=True)
    for round_no in range(args.rounds):
        for label in ["ours", *variants]:
            server = runner.server_process(label, None, opts, shape)
            server.start()
            try:
                result = measure(server, req, args.rate, args.seconds, opts)
            finally:
                server.stop()
            results.setdefault(label, []).append(result)
            print(json.dumps({"round": round_no + 1, "server": label, **_rounded(result)}), flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    print(summary(results))
    (args.out / "tail.json").write_text(json.dumps({"rate": args.rate, "results": results}, indent=1))


def summary(results: Dict[str, List[Dict]]) -> str:
    """Medians over the rounds per server, with every round's open-loop p99 (the number that moves most)."""
    lines = ["| server | c=1 p50 ms | c=64 req/s | open loop p50 ms | open loop p99 ms (every round) | rows/call |",
             "|---|---:|---:|---:|---|---:|"]
    for label, rounds in results.items():
        p99s = [r["open_loop"]["p99_ms"] for r in rounds]
        lines.append(f"| {label} | {statistics.median(r['c1_p50_ms'] for r in rounds):.2f} | "
                     f"{statistics.median(r['c64_req_per_s'] for r in rounds):,.0f} | "
                     f"{statistics.median(r['open_loop']['p50_ms'] for r in rounds):.1f} | "
                     f"{statistics.median(p99s):.1f} ({', '.join(f'{v:.0f}' for v in p99s)}) | "
                     f"{statistics.median(r['rows_per_call'] or 0.0 for r in rounds):.1f} |")
    return "\n".join(lines)


def _rounded(value):
    if isinstance(value, dict):
        return {key: _rounded(v) for key, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return round(value, 2) if isinstance(value, float) else value


if __name__ == "__main__":
    main()
