"""Write the one artifact the service loads: a TorchScript module with metadata.json embedded.

The artifact contract (DESIGN.md). Exported methods, all float32 on the module's device:
- ``encode(x) -> (mu, logvar)``: x (B, C, H, W) in [0, 1]; the module itself snaps x onto the data's support
  (the pixel-level grid, or {0, 1} for a Bernoulli model), so callers only scale 8-bit pixels by 1/255.
- ``decode(z) -> x``: z (B, D) -> pixel means (B, C, H, W) in [0, 1].
- ``score(x, eps) -> (iw_ll, elbo, rec, kl, log_w)``: eps (K, B, D) standard normal noise chosen by the caller.
  Per row: the K-sample importance-weighted log-likelihood bound, the ELBO, its reconstruction and KL terms
  (all (B,), nats) and the log importance weights (K, B). Rows never mix, so the same row with the same noise
  gets the same numbers in any batch.
``metadata.json`` is described by ``build_metadata``; ``FORMAT_VERSION`` bumps on incompatible changes.
"""

import hashlib
import json
import logging
import os
import warnings
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, Iterator, Tuple

import torch
from torch import Tensor, nn

from training import objectives
from training.model import VAE

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
# Scripted and eager kernels may fuse differently; this is far below one 8-bit pixel level (1/255 ~ 4e-3)
# and below 1e-3 nats per image.
ROUNDTRIP_ATOL = 1e-4

METHODS = {
    "encode": "encode(x: float32[B,C,H,W] in [0,1]) -> (mu: [B,D], logvar: [B,D])",
    "decode": "decode(z: float32[B,D]) -> pixel means float32[B,C,H,W] in [0,1]",
    "score": "score(x: float32[B,C,H,W], eps: float32[K,B,D] ~ N(0,I)) -> "
    "(iw_log_likelihood[B], elbo[B], reconstruction[B], kl[B], log_weights[K,B]), nats",
}


class ArtifactError(RuntimeError):
    """The artifact is missing, unreadable, or does not match the eager model."""


class ServingModule(nn.Module):
    """What the artifact exposes; the VAE math stays in `training.model` / `training.objectives`."""

    def __init__(self, vae: VAE) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        return self.encode(x)

    @torch.jit.export
    def encode(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        return self.vae.encode(self.vae.quantize(x))

    @torch.jit.export
    def decode(self, z: Tensor) -> Tensor:
        return self.vae.decode(z)

    @torch.jit.export
    def score(self, x: Tensor, eps: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        log_w, log_px_z, mu, logvar = self.vae.importance_weights(self.vae.quantize(x), eps)
        rec = log_px_z.t().contiguous().mean(dim=1)  # per row over K, the same whatever the batch size
        kl = objectives.kl_standard_normal(mu, logvar)
        return objectives.iw_bound(log_w), rec - kl, rec, kl, log_w


@contextmanager
def quiet_torchscript() -> Iterator[None]:
    """TorchScript is deprecated from torch 2.11 on and warns on script/save/load; the design keeps it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*TorchScript.*", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r".*torch\.jit.*", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r".*TorchScript.*", category=FutureWarning)
        warnings.filterwarnings("ignore", message=r".*torch\.jit.*", category=FutureWarning)
        yield


def weights_sha256(module: nn.Module) -> str:
    """sha256 over the state dict: per entry, sorted by name, the name, dtype, shape and raw bytes."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def build_metadata(vae: VAE, **sections: Any) -> Dict[str, Any]:
    """The metadata.json document. ``sections`` adds the caller's parts: data, training, evaluation,
    calibration (each a JSON-able dict). The model and versioning parts are filled in here."""
    cfg = vae.config
    meta: Dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "model": {
            "architecture": "conv-vae",
            "image": {"channels": cfg.channels, "height": cfg.height, "width": cfg.width},
            "latent_dim": cfg.latent_dim,
            "likelihood": cfg.likelihood,
            "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
        },
        "pixels": {
            "input": "float32 in [0, 1]: 8-bit value / 255; the model snaps it onto its own support",
            "levels": cfg.levels,
            "support": "{0, 1} (threshold 0.5)" if cfg.likelihood == "bernoulli" else f"k / {cfg.levels - 1}",
            "num_dims": cfg.num_dims,
        },
        "methods": METHODS,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch_version": torch.__version__,
    }
    meta.update(sections)
    return meta


def export_artifact(vae: VAE, path: Path, metadata: Dict[str, Any], check_x: Tensor) -> Dict[str, Any]:
    """Script ``vae``, embed ``metadata`` (+ weights sha256), write ``path`` atomically, reload it and
    compare every method with the eager model on ``check_x``. Raises ArtifactError on any mismatch."""
    vae = vae.eval().cpu()
    serving = ServingModule(vae).eval()
    with quiet_torchscript():
        scripted = torch.jit.script(serving)
    meta = dict(metadata, weights_sha256=weights_sha256(scripted))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with quiet_torchscript():
        torch.jit.save(scripted, str(tmp), _extra_files={METADATA_FILE: json.dumps(meta, indent=1, allow_nan=False)})
    os.replace(tmp, path)  # readers never see a half-written artifact
    reloaded, reloaded_meta = load_artifact(path)
    if reloaded_meta != json.loads(json.dumps(meta)):
        raise ArtifactError(f"{path}: metadata did not survive the round trip")
    max_diff = compare_with_eager(serving, reloaded, check_x.cpu())
    log.info("exported %s (max |scripted - eager| = %.2e)", path, max_diff)
    return meta


@torch.inference_mode()
def compare_with_eager(eager: ServingModule, scripted: torch.jit.ScriptModule, x: Tensor, k: int = 4) -> float:
    """Largest absolute difference across encode/decode/score; raises ArtifactError above ROUNDTRIP_ATOL."""
    gen = torch.Generator().manual_seed(0)
    eps = torch.randn(k, x.shape[0], eager.vae.config.latent_dim, generator=gen)
    pairs = {
        "encode": (eager.encode(x), scripted.encode(x)),
        "decode": (eager.decode(eps[0]), scripted.decode(eps[0])),
        "score": (eager.score(x, eps), scripted.score(x, eps)),
    }
    worst = 0.0
    for name, (a, b) in pairs.items():
        a_list = list(a) if isinstance(a, tuple) else [a]
        b_list = list(b) if isinstance(b, tuple) else [b]
        for ta, tb in zip(a_list, b_list):
            # Scores are sums over all pixels: compare them relative to their size.
            scale = max(1.0, float(ta.abs().max())) if name == "score" else 1.0
            diff = float((ta - tb).abs().max()) / scale
            worst = max(worst, diff)
            if not diff <= ROUNDTRIP_ATOL:
                raise ArtifactError(f"scripted {name} differs from eager by {diff:.3e} (> {ROUNDTRIP_ATOL:.0e})")
    return worst


def load_artifact(path: Path, map_location: str = "cpu") -> Tuple[torch.jit.ScriptModule, Dict[str, Any]]:
    """Load and sanity-check an artifact; ArtifactError with the reason if it is unusable."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: no such artifact file")
    extra = {METADATA_FILE: ""}
    try:
        with quiet_torchscript():
            module = torch.jit.load(str(path), map_location=map_location, _extra_files=extra)
    except Exception as exc:  # torch raises RuntimeError/ValueError/zipfile errors for damaged files
        raise ArtifactError(f"{path}: not a readable TorchScript artifact ({type(exc).__name__}: {exc})") from exc
    try:
        meta = json.loads(extra[METADATA_FILE] or "null")
    except ValueError as exc:
        raise ArtifactError(f"{path}: metadata.json is not valid JSON ({exc})") from exc
    if not isinstance(meta, dict) or "format_version" not in meta:
        raise ArtifactError(f"{path}: no metadata.json with a format_version inside")
    if meta["format_version"] > FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: artifact format {meta['format_version']} is newer than this code understands ({FORMAT_VERSION})"
        )
    if meta.get("weights_sha256") != weights_sha256(module):
        raise ArtifactError(f"{path}: weights do not match the sha256 recorded in its metadata")
    return module, meta


def artifact_bytes_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


__all__ = ["ArtifactError", "ServingModule", "build_metadata", "export_artifact", "load_artifact"]
