"""Write the one artifact the service loads: a TorchScript module with metadata.json embedded.

The artifact contract (docs/architecture.md). Exported methods, all float32 on the module's device:
- ``encode(x) -> (mu, logvar)``: x (B, C, H, W) in [0, 1]; the module itself snaps x onto the data's support
  (the pixel-level grid, or {0, 1} for a Bernoulli model), so callers only scale 8-bit pixels by 1/255.
- ``decode(z) -> x``: z (B, D) -> pixel means (B, C, H, W) in [0, 1].
- ``score(x, eps) -> (iw_ll, elbo, rec, kl, log_w)``: eps (K, B, D) standard normal noise chosen by the caller.
  Per row: the K-sample importance-weighted log-likelihood bound, the ELBO, its reconstruction and KL terms
  (all (B,), nats) and the log importance weights (K, B). Rows never mix, so the same row with the same noise
  gets the same numbers in any batch. log p(z) in the weights is the prior's exact density.
- ``sample_prior(eps, component) -> z``: eps (B, D) standard normal, component (B,) int64 mixture indices, both
  chosen by the caller (so a seed decides the samples): z = mu_k + sigma_k * eps under the VampPrior, z = eps
  under N(0, I).
- ``prior_log_prob(z) -> log p(z)``: z (..., D) -> (...), nats.
- ``latent_neighbour_distance(x) -> d``: x as for ``encode`` -> (B,) Euclidean distance from the posterior mean to
  the nearest row of the buffer ``latent_bank`` (N, D), posterior means of training images (``latent_bank``
  below); each row on its own, so a row's distance does not depend on its batch. Listed in ``methods`` only
  when the artifact has a bank.
- ``latent_log_density(x) -> log q``: x as for ``encode`` -> (B,) float64, the log density of the image's latent
  features under the mixture in the buffers ``density_*`` (``training.density``); each row on its own. Listed in
  ``methods`` only when the artifact has a density.
``metadata.json`` is described by ``build_metadata`` and checked, saved and loaded by the contract's own
package (``vae_artifact``); this module only builds the serving module and proves it equals the eager model.
"""

import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from training import density as latent_density, objectives, priors
from training.data import Dataset, Split, to_8bit
from training.model import VAE, VAEConfig
from vae_artifact.errors import ArtifactError
from vae_artifact.io import load_artifact, quiet_torchscript, save_artifact
from vae_artifact.metadata import DENSITY_METHODS, FORMAT_VERSION, METHODS, NEIGHBOUR_METHODS, PRIOR_METHODS

log = logging.getLogger(__name__)

# Scripted and eager kernels may fuse differently; this is far below one 8-bit pixel level (1/255 ~ 4e-3)
# and below 1e-3 nats per image.
ROUNDTRIP_ATOL = 1e-4


class ServingModule(nn.Module):
    """What the artifact exposes; the VAE math stays in `training.model` / `training.objectives` / `training.priors`.

    The prior is frozen here: the VampPrior's components are the encoder's posteriors at the pseudo-inputs,
    computed once from the weights the module is built with (so build it from the final, eval-mode model),
    which makes its sampler a gather and spares every score call N encoder passes.
    """

    def __init__(self, vae: VAE, latent_bank: Optional[Tensor] = None,
                 density: Optional[latent_density.LatentDensity] = None) -> None:
        super().__init__()
        self.vae = vae
        # Posterior means of training images (``latent_bank``); empty: no bank, the method raises.
        bank = torch.zeros(0, vae.config.latent_dim) if latent_bank is None else latent_bank.detach().float()
        if bank.ndim != 2 or bank.shape[1] != vae.config.latent_dim:
            raise ValueError(f"latent_bank must be (N, {vae.config.latent_dim}), got {tuple(bank.shape)}")
        self.register_buffer("latent_bank", bank.contiguous())
        # The latent density's mixture (``training.density``); no components: no density, the method raises.
        density = density or latent_density.LatentDensity.empty(vae.config.latent_dim + 1)
        if density.means.ndim != 2 or density.means.shape[1] != vae.config.latent_dim + 1:
            raise ValueError(f"the latent density's means must be (M, {vae.config.latent_dim + 1}), "
                             f"got {tuple(density.means.shape)}")
        self.register_buffer("density_means", density.means.double().contiguous())
        self.register_buffer("density_precision_cholesky", density.precision_cholesky.double().contiguous())
        self.register_buffer("density_log_constant", density.log_constant.double().contiguous())
        self.closed_form_kl = vae.vamp is None
        if vae.vamp is None:
            self.prior: nn.Module = priors.StandardNormal()
        else:
            with torch.no_grad():
                self.prior = priors.Mixture(*vae.prior_components())

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
        z, log_px_z, mu, logvar = self.vae.importance_samples(self.vae.quantize(x), eps)
        log_w = objectives.importance_log_weights(log_px_z, self.prior.log_prob(z), z, mu, logvar)
        # Reduce over K along contiguous (B, K) rows: each row is then reduced the same way whatever the batch
        # size (a (K, 1) column takes another summation order than a column of (K, B)), so a row gets the same
        # bits alone or in a batch.
        rec = log_px_z.t().contiguous().mean(dim=1)
        iw = objectives.iw_bound(log_w.t().contiguous(), dim=1)
        if self.closed_form_kl:
            kl = objectives.kl_standard_normal(mu, logvar)
        else:  # no closed form: the K-sample estimate of E_q[log q(z|x) - log p(z)], per contiguous row too
            kl = (log_px_z - log_w).t().contiguous().mean(dim=1)
        return iw, rec - kl, rec, kl, log_w

    @torch.jit.export
    def latent_neighbour_distance(self, x: Tensor) -> Tensor:
        if self.latent_bank.shape[0] == 0:
            raise RuntimeError("this artifact has no latent bank")
        mu, _ = self.encode(x)
        # Pair by pair, not through a matrix product: a row's distances then do not depend on the other rows.
        distances = torch.cdist(mu, self.latent_bank, compute_mode="donot_use_mm_for_euclid_dist")
        return distances.min(dim=1).values

    @torch.jit.export
    def latent_log_density(self, x: Tensor) -> Tensor:
        if self.density_means.shape[0] == 0:
            raise RuntimeError("this artifact has no latent density")
        mu, logvar = self.encode(x)
        return latent_density.mixture_log_density(latent_density.features(mu, logvar), self.density_means,
                                                  self.density_precision_cholesky, self.density_log_constant)

    @torch.jit.export
    def sample_prior(self, eps: Tensor, component: Tensor) -> Tensor:
        return self.prior.sample(eps, component)

    @torch.jit.export
    def prior_log_prob(self, z: Tensor) -> Tensor:
        return self.prior.log_prob(z)


@torch.inference_mode()
def latent_bank(vae: VAE, split: Split, levels: int, n: int, seed: int = 0, batch_size: int = 512) -> Tensor:
    """Posterior means (n, D) of a seeded uniform sample of ``n`` images of ``split`` (all of them when it has
    fewer), encoded as served: 8-bit, through ``ServingModule.encode``."""
    rng = np.random.default_rng(seed)
    picks = np.sort(rng.choice(len(split), size=n, replace=False)) if n < len(split) else np.arange(len(split))
    images = to_8bit(split.images[picks], levels)
    serving = ServingModule(vae.eval())
    device = next(vae.parameters()).device
    parts = [serving.encode(torch.from_numpy(images[i:i + batch_size]).to(device).float().div_(255.0))[0]
             for i in range(0, len(images), batch_size)]
    return torch.cat(parts).cpu() if parts else torch.zeros(0, vae.config.latent_dim)


def eager_vae(module: torch.jit.ScriptModule, meta: Mapping[str, Any]) -> VAE:
    """An artifact's VAE as an eager module in eval mode, from its recorded config and its own weights."""
    vae = VAE(VAEConfig(**meta["model"]["config"]))
    vae.load_state_dict({name[len("vae."):]: t for name, t in module.state_dict().items() if name.startswith("vae.")})
    return vae.eval()


def with_latent_statistics(module: torch.jit.ScriptModule, meta: Mapping[str, Any], dataset: Dataset, *,
                           bank: Optional[int] = None, density: bool = False, seed: int = 0
                           ) -> Tuple[torch.jit.ScriptModule, Dict[str, str], Optional[Dict]]:
    """An artifact's module scripted again from its own config, weights, bank and density, now with a latent bank
    of ``bank`` images of ``dataset``'s train split (when given) and a latent density fitted on that split (with
    ``density``); the ``methods`` its metadata must then list, and the density's summary (None without a new
    one). Every method is checked against the eager model (ArtifactError on a mismatch)."""
    vae, state = eager_vae(module, meta), module.state_dict()
    latent = latent_bank(vae, dataset.train, dataset.levels, bank, seed=seed) if bank else state.get("latent_bank")
    fitted = None
    if density:
        fitted = latent_density.fit_split(ServingModule(vae).encode, dataset.train, dataset.levels,
                                          torch.device("cpu"), seed=seed)
    elif "density_means" in state:
        fitted = latent_density.LatentDensity(state["density_means"], state["density_precision_cholesky"],
                                              state["density_log_constant"], {})
    serving = ServingModule(vae, latent, fitted).eval()
    with quiet_torchscript():
        scripted = torch.jit.script(serving)
    check_x = torch.from_numpy(to_8bit(dataset.test.images[:8], dataset.levels)).float() / 255
    compare_with_eager(serving, scripted, check_x)
    return scripted, methods(serving), fitted.summary if density else None


def methods(serving: ServingModule) -> Dict[str, str]:
    """The ``methods`` a serving module's metadata lists: the contract's, and its latent statistics' when it has
    what they need."""
    return {**METHODS, **(NEIGHBOUR_METHODS if len(serving.latent_bank) else {}),
            **(DENSITY_METHODS if len(serving.density_means) else {})}


def build_metadata(serving: ServingModule, **sections: Any) -> Dict[str, Any]:
    """The metadata.json document of ``serving``. ``sections`` adds the caller's parts: data, training,
    evaluation, calibration (each a JSON-able dict). The model, its methods and versioning are filled in here."""
    vae = serving.vae
    cfg = vae.config
    meta: Dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "model": {
            "architecture": "conv-vae",
            "image": {"channels": cfg.channels, "height": cfg.height, "width": cfg.width},
            "latent_dim": cfg.latent_dim,
            "likelihood": cfg.likelihood,
            # The prior and its exported methods (absent in older artifacts, whose prior is N(0, I)).
            "prior": {"name": cfg.prior, "components": max(1, cfg.pseudo_inputs), "methods": PRIOR_METHODS},
            "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
        },
        "pixels": {
            "input": "float32 in [0, 1]: 8-bit value / 255; the model snaps it onto its own support",
            "levels": cfg.levels,
            "support": "{0, 1} (threshold 0.5)" if cfg.likelihood == "bernoulli" else f"k / {cfg.levels - 1}",
            "num_dims": cfg.num_dims,
        },
        "methods": methods(serving),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch_version": torch.__version__,
    }
    meta.update(sections)
    return meta


def export_artifact(serving: ServingModule, path: Path, metadata: Dict[str, Any], check_x: Tensor) -> Dict[str, Any]:
    """Script ``serving`` (on the CPU), save it with ``metadata`` (the contract adds the weights sha256), reload it
    and compare every method with the eager module on ``check_x``. Returns the written metadata document; raises
    ArtifactError on any mismatch."""
    serving = serving.eval().cpu()
    with quiet_torchscript():
        scripted = torch.jit.script(serving)
    written = save_artifact(scripted, path, metadata)
    reloaded, reloaded_meta = load_artifact(path)
    if reloaded_meta.to_dict() != written.to_dict():
        raise ArtifactError(f"{path}: metadata did not survive the round trip")
    max_diff = compare_with_eager(serving, reloaded, check_x.cpu())
    log.info("exported %s (max |scripted - eager| = %.2e)", path, max_diff)
    return written.to_dict()


@torch.inference_mode()
def compare_with_eager(eager: ServingModule, scripted: torch.jit.ScriptModule, x: Tensor, k: int = 4) -> float:
    """Largest absolute difference across encode/decode/score; raises ArtifactError above ROUNDTRIP_ATOL."""
    gen = torch.Generator().manual_seed(0)
    eps = torch.randn(k, x.shape[0], eager.vae.config.latent_dim, generator=gen)
    component = torch.randint(0, max(1, eager.vae.config.pseudo_inputs), (x.shape[0],), generator=gen)
    pairs = {
        "encode": (eager.encode(x), scripted.encode(x)),
        "decode": (eager.decode(eps[0]), scripted.decode(eps[0])),
        "score": (eager.score(x, eps), scripted.score(x, eps)),
        "sample_prior": (eager.sample_prior(eps[0], component), scripted.sample_prior(eps[0], component)),
        "prior_log_prob": (eager.prior_log_prob(eps), scripted.prior_log_prob(eps)),
    }
    if eager.latent_bank.shape[0]:
        pairs["latent_neighbour_distance"] = (eager.latent_neighbour_distance(x), scripted.latent_neighbour_distance(x))
    if eager.density_means.shape[0]:
        pairs["latent_log_density"] = (eager.latent_log_density(x), scripted.latent_log_density(x))
    worst = 0.0
    for name, (a, b) in pairs.items():
        a_list = list(a) if isinstance(a, tuple) else [a]
        b_list = list(b) if isinstance(b, tuple) else [b]
        for ta, tb in zip(a_list, b_list):
            # Scores are sums over all pixels, log densities over features: compare them relative to their size.
            scale = max(1.0, float(ta.abs().max())) if name in ("score", "latent_log_density") else 1.0
            diff = float((ta - tb).abs().max()) / scale
            worst = max(worst, diff)
            if not diff <= ROUNDTRIP_ATOL:
                raise ArtifactError(f"scripted {name} differs from eager by {diff:.3e} (> {ROUNDTRIP_ATOL:.0e})")
    return worst


__all__ = ["ArtifactError", "ServingModule", "build_metadata", "compare_with_eager", "eager_vae", "export_artifact",
           "latent_bank", "methods", "with_latent_statistics"]
