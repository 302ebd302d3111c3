"""The targets as ratios from one run, and the markdown report (bench/results/latest.md is one)."""

import math
import statistics
from typing import Dict, List, Optional

RSS_LIMIT_MB = 800.0  # every server process together
COLD_START_LIMIT_S = 5.0
SERVER_ORDER = ("ours", "naive", "litserve-1w", "litserve-2w", "ceiling")


def _get(results: Dict, workload: str, server: str, key: str) -> Optional[float]:
    value = results["runs"].get(workload, {}).get(server, {}).get(key)
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _litserve(results: Dict, workload: str) -> Optional[float]:
    """LitServe's rate at its best worker count on this workload (every count run is in the table)."""
    rates = [_get(results, workload, name, "req_per_s") for name in results["runs"].get(workload, {})
             if name.startswith("litserve")]
    rates = [r for r in rates if r is not None]
    return max(rates) if rates else None


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


def _target(name: str, value: Optional[float], limit: float, higher_is_better: bool, unit: str = "") -> Dict:
    ok = None if value is None else (value >= limit if higher_is_better else value <= limit)
    return {"target": name, "value": value, "limit": limit, "op": ">=" if higher_is_better else "<=", "unit": unit,
            "pass": ok}


def targets(results: Dict) -> List[Dict]:
    """The targets, as ratios measured side by side in this run."""
    ours_c64 = _get(results, "encode_c64", "ours", "req_per_s")
    ours_anomaly = _get(results, "anomaly_c16", "ours", "req_per_s")
    out = [
        _target("/encode c=1: ours p50 / naive p50", _ratio(_get(results, "encode_c1", "ours", "p50_ms"),
                                                            _get(results, "encode_c1", "naive", "p50_ms")),
                1.1, False, "x"),
        _target("/encode c=64: ours / naive (req/s)", _ratio(ours_c64, _get(results, "encode_c64", "naive", "req_per_s")),
                2.0, True, "x"),
        _target("/encode c=64: ours / LitServe at its best worker count (req/s)",
                _ratio(ours_c64, _litserve(results, "encode_c64")), 1.5, True, "x"),
        _target("/anomaly-score c=16: ours / naive (req/s)",
                _ratio(ours_anomaly, _get(results, "anomaly_c16", "naive", "req_per_s")), 1.3, True, "x"),
        _target("/anomaly-score c=16: ours / LitServe at its best worker count (req/s)",
                _ratio(ours_anomaly, _litserve(results, "anomaly_c16")), 1.5, True, "x"),
        _target("/encode c=64: ours / ceiling (req/s), for reference",
                _ratio(ours_c64, _get(results, "encode_c64", "ceiling", "req_per_s")), 0.0, True, "x"),
    ]
    inproc = results.get("inprocess", {}).get("encode", {}).get("256", {}).get("images_per_s")
    out.append(_target("256-image .npy: ours / in-process at batch 256 (images/s)",
                       _ratio(_get(results, "npy256_c1", "ours", "images_per_s"), inproc), 0.8, True, "x"))
    ours = results.get("ours", {})
    half = ours.get("half_load", {})
    p50 = _get(results, "encode_c1", "ours", "p50_ms")
    out.append(_target("p99 at half max throughput / unloaded p50 (encode c=1)",
                       _ratio(half.get("p99_ms"), p50), 5.0, False, "x"))
    floor = ours.get("half_load_ceiling", {})
    out.append(_target("the same open loop on the ceiling (no model) / our unloaded p50, for reference",
                       _ratio(floor.get("p99_ms"), p50), 0.0, True, "x"))
    cold = ours.get("cold_start_s") or []
    out.append(_target("cold start to ready, median (s)", statistics.median(cold) if cold else None,
                       COLD_START_LIMIT_S, False, "s"))
    out.append(_target("resident memory after the load, all processes (MB)",
                       ours.get("rss_after_load", {}).get("group_mb"), RSS_LIMIT_MB, False, "MB"))
    gen = results.get("generator_check", {}).get("req_per_s")
    out.append(_target("load generator: GET /constant rate / ours /encode c=64 rate", _ratio(gen, ours_c64),
                       3.0, True, "x"))
    return out


def _cpus(results: Dict) -> str:
    return str(results.get("meta", {}).get("cpus", "?"))


def _f(value, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:,.{digits}f}"


def _rounds(results: Dict) -> List[float]:
    ours = results["runs"].get("encode_c1", {}).get("ours", {})
    return ours.get("rounds_req_per_s") or [0.0]


def markdown(results: Dict) -> str:
    meta = results["meta"]
    shape = meta["model_shape"]
    lines = [
        "## Benchmark results",
        "",
        f"Command: `{meta['command']}`  ",
        f"Model: `{meta['model']}` ({shape['channels']}x{shape['height']}x{shape['width']}, latent "
        f"{shape['latent_dim']}, score K={shape['score_k']}); inputs: 28x28 PNGs from `{meta['images']}`.  ",
        f"Machine: {meta['cpus']} CPUs, {meta['platform']}, Python {meta['python']}, torch {meta['torch']}, "
        f"models on {meta.get('device', 'cpu')}; "
        f"{meta['torch_threads']} torch thread(s) in every server; generator: {meta['generator']}; "
        f"{meta['duration_s']:g} s per measurement after {meta['warmup_s']:g} s of warm-up; "
        f"1-min load average {meta['load_before'][0]:.2f} before, {meta['load_after'][0]:.2f} after.  ",
        f"Batch delay (ours; LitServe's batch_timeout): {meta['batch_delay_ms']:g} ms; "
        f"LitServe workers_per_device: {meta.get('lit_workers', 1)} (litserve-Nw); ours and the ceiling: "
        f"{meta.get('processes', 1)} server process(es). Best of {len(_rounds(results))} round(s) per server; "
        "every round's req/s in the last column.",
        "",
        "| Workload | Server | req/s | images/s | p50 ms | p95 ms | p99 ms | errors | mean batch | rounds (req/s) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for workload, by_server in results["runs"].items():
        names = [s for s in SERVER_ORDER if s in by_server] + [s for s in by_server if s not in SERVER_ORDER]
        for server in names:
            r = by_server[server]
            if not r.get("probe_ok"):
                lines.append(f"| {workload} | {server} | probe failed ({r.get('probe_status')}) |||||||")
                continue
            lines.append(f"| {workload} | {server} | {_f(r['req_per_s'])} | {_f(r['images_per_s'], 0)} | "
                         f"{_f(r['p50_ms'], 2)} | {_f(r['p95_ms'], 2)} | {_f(r['p99_ms'], 2)} | {r['error_count']} | "
                         f"{_f(r.get('mean_batch'))} | {', '.join(_f(v, 0) for v in r.get('rounds_req_per_s', []))} |")
    lines += ["", "Workloads: " + "; ".join(f"`{k}`: {v}" for k, v in results.get("workloads", {}).items()) + ".",
              "Servers: `ours` = `python -m service` (defaults); `naive` = FastAPI, one model call per request in the "
              "thread pool; `litserve-Nw` = LitServe with max_batch_size 64 and N workers; `ceiling` = the same "
              "FastAPI/uvicorn stack (and process count) parsing and decoding the same body with our multipart "
              "parser, answering a constant of the same size.", ""]
    lines += ["### Targets", "", "| Target | Value | Limit | Pass |", "|---|---:|---:|:---:|"]
    for t in results.get("targets", []):
        mark = {True: "PASS", False: "FAIL", None: "n/a"}[t["pass"]]
        lines.append(f"| {t['target']} | {_f(t['value'], 2)} {t['unit']} | {t['op']} {_f(t['limit'], 2)} | {mark} |")
    lines += ["", "### In-process model throughput (images/s, no HTTP)", ""]
    inproc = results.get("inprocess", {})
    batches = sorted({int(b) for k in inproc.values() for b in k}, key=int)
    lines += ["| Kernel | " + " | ".join(f"batch {b}" for b in batches) + " |",
              "|---|" + "---:|" * len(batches)]
    for kernel, by_batch in inproc.items():
        lines.append(f"| {kernel} | " + " | ".join(_f(by_batch.get(str(b), {}).get("images_per_s"), 0)
                                                for b in batches) + " |")
    ours = results.get("ours", {})
    if ours:
        rss = ours.get("rss_after_load", {})
        half = ours.get("half_load", {})
        lines += ["", "### Our service", "",
                  f"- Start to ready (this run): {_f(ours.get('start_to_ready_s'), 2)} s; cold starts: "
                  f"{', '.join(_f(t, 2) for t in ours.get('cold_start_s', []))} s.",
                  f"- Resident memory after the load, every process: {_f(rss.get('group_mb'))} MB "
                  f"(the first process alone: {_f(rss.get('main_mb'))} MB).",
                  f"- Open loop at {_f(half.get('offered_rate'))} req/s (half the c=64 rate): achieved "
                  f"{_f(half.get('req_per_s'))} req/s, p50 {_f(half.get('p50_ms'), 2)} ms, "
                  f"p99 {_f(half.get('p99_ms'), 2)} ms, errors {half.get('error_count', '–')}; the Python "
                  f"generator itself used {_f(half.get('generator_cores'), 2)} of the {_cpus(results)} cores."]
        floor = ours.get("half_load_ceiling")
        if floor:
            lines.append(f"- The same open loop against the ceiling server (no model): p50 {_f(floor.get('p50_ms'), 2)} "
                         f"ms, p99 {_f(floor.get('p99_ms'), 2)} ms, generator {_f(floor.get('generator_cores'), 2)} "
                         "cores: the tail that the HTTP stack and the generator alone leave on this machine.")
    gen = results.get("generator_check", {})
    if gen:
        lines.append(f"- Load generator check: GET /constant on the ceiling server at c=64: {_f(gen.get('req_per_s'), 0)}"
                     " req/s.")
    return "\n".join(lines) + "\n"
