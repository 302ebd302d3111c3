"""Every setting of the service, read once from arguments or ``VAE_*`` environment variables.

The one place that reads the environment. ``create_app(settings)`` receives an instance; nothing else
builds one.
"""

import re
from pathlib import Path
from typing import List, Optional

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VAE_", extra="ignore", protected_namespaces=())

    model_path: Path = Path("models/vae.ts")
    device: str = "auto"  # auto = first CUDA device when present, else CPU
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    log_level: str = "info"

    # Batching: rows from concurrent requests share one model call of at most max_batch_rows rows. A
    # batch starts when a model worker is free, with every row waiting by then; batch_delay_ms > 0 holds
    # it open that much longer for more rows, but only while a worker is idle.
    max_batch_rows: int = Field(64, ge=1, le=4096)
    batch_delay_ms: float = Field(0.0, ge=0.0, le=1000.0)
    # Threads running model calls side by side. Default (service.core.devices.default_workers): the
    # process's share of the usable CPU cores on CPU, one on a GPU.
    model_workers: Optional[int] = Field(None, ge=1, le=64)
    # Server processes behind the one port, each a full replica (model, batcher, workers); see
    # service/supervisor.py. Default (service.core.devices.default_processes): one per usable CPU core, a
    # container's quota counted, one on a GPU.
    processes: Optional[int] = Field(None, ge=1, le=64)
    # Where the processes keep their metric values (set by the supervisor; None with one process).
    metrics_dir: Optional[Path] = None
    # Batch shapes: on a GPU a batch is padded up to the smallest bucket that fits (each warmed at
    # start-up); on CPU it runs at its exact size, padded only up to the size from which the warm-up found
    # every row bit-identical to the largest call (service.core.runtime). The largest bucket is max_batch_rows.
    buckets: List[int] = Field(default_factory=lambda: [4, 16, 64])
    # A score row costs K decodes; one score call holds at most this many decoded images (default: the
    # runtime's SCORE_DECODES for the device: small calls on CPU, one full call on a GPU).
    max_score_decodes: Optional[int] = Field(None, ge=1)
    queue_limit: int = Field(2048, ge=1)  # rows waiting per kernel before new work gets 503
    max_in_flight: int = Field(512, ge=1)  # model requests being parsed or waiting; more get 503 at once
    request_timeout_s: float = Field(30.0, gt=0.0)  # default deadline; X-Request-Timeout may lower it

    # Request limits, checked before any work is done.
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024)
    max_rows: int = Field(512, ge=1)  # images or z vectors per request
    max_pixels: int = Field(4096 * 4096, ge=1)  # per source image, before resizing
    max_n: int = Field(512, ge=1)  # /sample
    max_steps: int = Field(256, ge=2)  # /interpolate
    max_k: int = Field(1024, ge=1)  # importance samples per anomaly score
    # Source pixels of all the images of one request, summed from their headers before any is decoded:
    # decoding costs by pixels, not bytes (a PNG of a few KB can hold millions). The default admits a few
    # images of the largest size max_pixels allows: a fraction of a CPU-second of decoding.
    max_request_pixels: int = Field(64 * 1024 * 1024, ge=1)
    # /metrics without the API key, for an in-cluster scraper that cannot send one; everything else but
    # /livez and /readyz still needs the key.
    metrics_public: bool = False
    # The page at / (service/api/routes/ui.py): a look at the model in a browser. Its three files need no key (the
    # page asks for it and sends it on its own requests); false serves no page and leaves those paths closed.
    ui: bool = True

    # POST /v1/model/reload and SIGHUP replace the served artifact in place (service.api.reload); off unless
    # enabled. A reload loads only files inside model_dir (default: the configured model's folder).
    allow_reload: bool = False
    model_dir: Optional[Path] = None

    api_key: Optional[SecretStr] = None  # when set, every non-health endpoint needs X-API-Key
    expected_sha256: Optional[str] = None  # refuse to start unless the artifact file has this sha256
    cors_origins: List[str] = Field(default_factory=list)  # CORS stays off unless origins are listed
    grace_period_s: float = Field(20.0, ge=0.0)  # SIGTERM: time for accepted requests to finish
    # Intra-op threads per model call; default on CPU: usable cores / model_workers (at least 1).
    torch_threads: Optional[int] = Field(None, ge=1)

    @property
    def reload_dir(self) -> Path:
        """The folder a reload may load artifacts from."""
        return self.model_dir if self.model_dir is not None else self.model_path.parent

    def server_processes(self) -> int:
        """How many server processes: ``processes``, or the default for this device and machine."""
        from service.core.devices import available_cpus, default_processes

        return self.processes or default_processes(self.device, available_cpus())

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not _DEVICE.match(value):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {value!r}")
        return value

    @field_validator("api_key", "expected_sha256", mode="before")
    @classmethod
    def _empty_is_unset(cls, value):
        # VAE_API_KEY= (set but empty, as compose and k8s often pass it) means "no key", not "the empty key".
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, value: str) -> str:
        value = value.lower()
        if value not in {"critical", "error", "warning", "info", "debug"}:
            raise ValueError(f"log_level must be critical|error|warning|info|debug, got {value!r}")
        return value

    @field_validator("expected_sha256")
    @classmethod
    def _sha(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", value):
            raise ValueError("expected_sha256 must be 64 hex digits")
        return value.lower() if value else value

    @model_validator(mode="after")
    def _buckets(self) -> "Settings":
        if not self.buckets or any(b < 1 for b in self.buckets):
            raise ValueError(f"buckets must be positive batch sizes, got {self.buckets}")
        self.buckets = sorted(set(b for b in self.buckets if b < self.max_batch_rows) | {self.max_batch_rows})
        return self
