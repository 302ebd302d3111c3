"""Prometheus metrics: one registry per app, so two apps in one process (tests) never collide.

Names and labels are a contract with deploy/ (dashboards and alert rules); change them together.

With several server processes (``service.supervisor``) every process writes its values to files in
``multiprocess_dir`` (prometheus-client's multiprocess mode) and a scrape of any process renders all of them:
counters and histograms summed, queue gauges summed over live processes, ``vae_ready`` the minimum over live
processes (ready only if every one is), and ``vae_process_ready`` one sample per process (``pid`` label).
"""

import os
from pathlib import Path
from typing import Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.multiprocess import MultiProcessCollector


READY_GAUGE = "vae_process_ready"  # per process (multiprocess_mode liveall): 1 when that process is ready
MODEL_GAUGE = "vae_process_model"  # per process: 1 for the sha256 of the artifact that process serves
RELOAD_OUTCOMES = ("switched", "unchanged", "refused", "failed")
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ROWS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
REJECTION_REASONS = ("queue_full", "overloaded", "deadline", "disconnected", "too_large", "unauthorized")
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self, registry: Optional[CollectorRegistry] = None, multiprocess_dir: Optional[Path] = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.multiprocess_dir = multiprocess_dir
        r = self.registry
        # role: what the endpoint's route says it is (model, probe, page, other), so alerts and dashboards
        # select the model endpoints without listing them.
        self.requests = Counter(
            "vae_requests", "HTTP requests by endpoint and status.", ["endpoint", "status", "role"], registry=r
        )
        self.request_seconds = Histogram(
            "vae_request_duration_seconds",
            "HTTP request latency by endpoint and status.",
            ["endpoint", "status", "role"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge("vae_queue_depth", "Rows waiting for the model, per kernel.", ["kernel"], registry=r,
                                 multiprocess_mode="livesum")
        self.queue_capacity = Gauge("vae_queue_capacity", "Row limit of each kernel's queue.", ["kernel"], registry=r,
                                    multiprocess_mode="livesum")
        self.queue_wait = Histogram(
            "vae_queue_wait_seconds",
            "Time rows waited between admission and their model call.",
            ["kernel"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_rows = Histogram(
            "vae_batch_rows", "Real (unpadded) rows per model call.", ["kernel"], buckets=ROWS_BUCKETS, registry=r
        )
        self.model_seconds = Histogram(
            "vae_model_seconds", "Time of one model call, per kernel.", ["kernel"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.rejections = Counter("vae_rejections", "Rejected or dropped work by reason.", ["reason"], registry=r)
        for reason in REJECTION_REASONS:
            self.rejections.labels(reason)  # exported at 0 so rate() works from the first scrape
        self.ready = Gauge("vae_ready", "1 when the model is loaded, warm and not draining (in every process).",
                           registry=r, multiprocess_mode="livemin")
        self.process_ready = Gauge(READY_GAUGE, "1 when this server process is warm and not draining.", registry=r,
                                   multiprocess_mode="liveall")
        self.model_info = Gauge(
            "vae_model_info", "1 for the artifact served now, 0 for one a reload replaced.", ["version", "sha256", "device"], registry=r,
            multiprocess_mode="livemax",
        )
        self.process_model = Gauge(MODEL_GAUGE, "1 for the artifact this server process serves now.", ["sha256"],
                                   registry=r, multiprocess_mode="liveall")
        self.reloads = Counter("vae_reloads", "Model reloads in this process, by outcome.", ["outcome"], registry=r)
        for outcome in RELOAD_OUTCOMES:
            self.reloads.labels(outcome)
        self.gpu_memory = Gauge(
            "vae_gpu_memory_bytes", "CUDA memory of the serving device.", ["device", "kind"], registry=r,
            multiprocess_mode="livesum",
        )

    def serving(self, info, device: str, previous=None) -> None:
        """The served artifact, in both gauges: ``info`` (a runtime's ModelInfo) now, ``previous`` no more."""
        if previous is not None:
            self.model_info.labels(previous.version, previous.sha256, device).set(0)
            self.process_model.labels(previous.sha256).set(0)
        self.model_info.labels(info.version, info.sha256, device).set(1)
        self.process_model.labels(info.sha256).set(1)

    def set_ready(self, ready: bool) -> None:
        """This process's readiness, in both gauges (the server's is their minimum over processes)."""
        self.ready.set(int(ready))
        self.process_ready.set(int(ready))

    def render(self) -> bytes:
        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        registry = CollectorRegistry()  # every process's values, read from their files at each scrape
        MultiProcessCollector(registry, path=str(self.multiprocess_dir))
        return generate_latest(registry)


def processes_ready(expected: int, metrics_dir: Path) -> bool:
    """Whether ``expected`` live processes each report ready, from the multiprocess metric files."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(metrics_dir))
    ready = sum(1 for metric in registry.collect() if metric.name == READY_GAUGE
                for sample in metric.samples if sample.value == 1 and _alive(int(sample.labels["pid"])))
    return ready >= expected


def processes_serving(sha256: str, metrics_dir: Path) -> int:
    """How many live server processes serve the artifact ``sha256``, from the multiprocess metric files."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(metrics_dir))
    return sum(1 for metric in registry.collect() if metric.name == MODEL_GAUGE for sample in metric.samples
               if sample.value == 1 and sample.labels.get("sha256") == sha256 and _alive(int(sample.labels["pid"])))


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs: a process killed a moment ago keeps its files (and, until the supervisor reaps
    it, its process table entry as a zombie) for up to one supervisor poll."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:  # no procfs: ask the kernel whether the pid exists
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")  # state, after the command name
