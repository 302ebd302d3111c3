"""Held-out metrics: validation ELBO, test ELBO / importance-weighted NLL, active units, anomaly scores.

Like nanoGPT's ``estimate_loss``: eval mode + ``inference_mode``, each function **returns** its numbers and
prints nothing. Sign conventions: ``*_elbo_nats`` is the ELBO itself (a log-likelihood bound, <= 0 for
discrete data); ``*_nll_nats`` and every ``*_bits_per_dim`` are negative log-likelihoods (lower is better).
"""

import math
import sys
from typing import Dict, Iterator, List, Optional

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from training import objectives
from training.export import ServingModule
from training.model import VAE, active_units
from vae_artifact import noise

# Rows (images x importance samples) per decoder call: bounds memory for any K (K=5000 runs in chunks).
MAX_ROWS = 4096


def _batches(x: Tensor, batch_size: int) -> Iterator[Tensor]:
    for start in range(0, x.shape[0], batch_size):
        yield x[start : start + batch_size]


class _EvalMode:
    """Put a module in eval mode for a block and restore its previous mode afterwards."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module, self.was_training = module, module.training

    def __enter__(self) -> None:
        self.module.eval()

    def __exit__(self, *exc: object) -> None:
        self.module.train(self.was_training)


@torch.inference_mode()
def estimate_elbo(vae: VAE, loader, device: torch.device, *, noise_seed: int = 0) -> Dict[str, float]:
    """One-sample ELBO **sums** over every image of ``loader``: {"n", "rec", "kl", "elbo"} (nats).

    Sums, not means, so ranks can all-reduce them before dividing. The noise comes from a generator seeded
    with ``noise_seed``, so the same weights always get the same number (early stopping compares epochs).
    """
    gen = torch.Generator(device).manual_seed(noise_seed)
    totals = {"n": 0.0, "rec": 0.0, "kl": 0.0, "elbo": 0.0}
    with _EvalMode(vae):
        for x, _ in loader:
            x = x.to(device, non_blocking=True)
            eps = torch.randn(x.shape[0], vae.config.latent_dim, generator=gen, device=device)
            rec, kl_terms, _ = vae(x, eps)
            kl = kl_terms.sum(dim=1)  # closed form under N(0, I); the one-sample estimate under the VampPrior
            totals["n"] += x.shape[0]
            totals["rec"] += float(rec.sum())
            totals["kl"] += float(kl.sum())
            totals["elbo"] += float((rec - kl).sum())
    return totals


def means(totals: Dict[str, float]) -> Dict[str, float]:
    """Per-image means of ``estimate_elbo`` sums, plus the loss (-ELBO)."""
    n = max(totals["n"], 1.0)
    out = {k: v / n for k, v in totals.items() if k != "n"}
    out["loss"] = -out["elbo"]
    return out


@torch.inference_mode()
def importance_weighted(vae: VAE, x: Tensor, k: int, generator: torch.Generator,
                        max_rows: int = MAX_ROWS) -> Dict[str, Tensor]:
    """Per image of x (B, C, H, W): the K-sample IW log-likelihood bound and the ELBO, both (B,) nats.

    K is drawn in chunks of at most ``max_rows // B`` samples and merged with a running logsumexp, so
    memory does not grow with K. The ELBO uses the mean reconstruction over the same K samples and the
    closed-form KL under N(0, I), or the mean of the K log weights under the VampPrior (whose KL has no
    closed form), as the exported ``score`` method does. log p(z) in the weights is exact for both priors.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    b, d = x.shape[0], vae.config.latent_dim
    x = vae.quantize(x)
    chunk = max(1, max_rows // b)
    running = torch.full((b,), -math.inf, dtype=torch.float64, device=x.device)
    rec_sum = torch.zeros(b, dtype=torch.float64, device=x.device)
    log_w_sum = torch.zeros(b, dtype=torch.float64, device=x.device)
    mu = logvar = None
    for start in range(0, k, chunk):
        eps = torch.randn(min(chunk, k - start), b, d, generator=generator, device=x.device)
        log_w, log_px_z, mu, logvar = vae.importance_weights(x, eps)  # (k_c, B) each
        running = torch.logaddexp(running, torch.logsumexp(log_w.double(), dim=0))
        rec_sum += log_px_z.double().sum(dim=0)
        log_w_sum += log_w.double().sum(dim=0)
    if vae.config.prior == "standard":
        elbo = rec_sum / k - objectives.kl_standard_normal(mu, logvar).double()
    else:
        elbo = log_w_sum / k  # = mean_k [log p(x|z_k) - (log q(z_k|x) - log p(z_k))]
    return {"iw_ll": running - math.log(k), "elbo": elbo, "mu": mu}


def _mean_se(values: np.ndarray) -> tuple:
    se = float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else float("nan")
    return float(values.mean()), se


def test_subset(total: int, n: Optional[int], seed: int) -> Optional[np.ndarray]:
    """Sorted indices of a uniform random subset of ``n`` of ``total`` test images (a function of the seed
    only), or None for all of them (``n`` None or 0, or not below ``total``)."""
    if n is not None and n < 0:
        raise ValueError(f"n must be >= 0 (0: every test image), got {n}")
    if not n or n >= total:
        return None
    return np.sort(np.random.default_rng(seed).choice(total, size=n, replace=False))


@torch.inference_mode()
def test_metrics(vae: VAE, x: Tensor, device: torch.device, *, k: int, seed: int = 0, n: Optional[int] = None,
                 batch_size: int = 256, progress: bool = False) -> Dict[str, float]:
    """Test-set ELBO and K-sample IW NLL (means with standard errors across images, nats and bits/dim),
    and the number of active latent units. ``x`` holds the test images as floats on the data's support.

    ``n``: score a uniform random subset of that many images (``test_subset``, seeded by ``seed``) instead of
    all of them; the means are then unbiased estimates of the whole test set's, and the standard errors
    (std across images / sqrt(n)) say how far from it they may be. ``progress``: a tqdm bar on stderr.
    """
    total = int(x.shape[0])
    subset = test_subset(total, n, seed)
    if subset is not None:
        x = x[torch.from_numpy(subset)]
    gen = torch.Generator(device).manual_seed(seed)
    iw_ll, elbo, mus = [], [], []
    bar = tqdm(total=int(x.shape[0]), desc=f"test IW-NLL (K={k})", unit="img", leave=False, disable=not progress,
               dynamic_ncols=True)
    with _EvalMode(vae), bar:
        for xb in _batches(x, batch_size):
            out = importance_weighted(vae, xb.to(device), k, gen)
            iw_ll.append(out["iw_ll"].cpu())
            elbo.append(out["elbo"].cpu())
            mus.append(out["mu"].cpu())
            bar.update(xb.shape[0])
    nll_mean, nll_se = _mean_se(-torch.cat(iw_ll).numpy())
    elbo_mean, elbo_se = _mean_se(torch.cat(elbo).numpy())
    dims = vae.config.num_dims
    return {
        "test_elbo_nats": elbo_mean,
        "test_elbo_se": elbo_se,
        "iw_nll_nats": nll_mean,
        "iw_nll_se": nll_se,
        "iw_k": k,
        "elbo_bits_per_dim": objectives.bits_per_dim(-elbo_mean, dims),
        "iw_nll_bits_per_dim": objectives.bits_per_dim(nll_mean, dims),
        "iw_nll_bits_per_dim_se": objectives.bits_per_dim(nll_se, dims),
        "active_units": active_units(torch.cat(mus)),
        "latent_dim": vae.config.latent_dim,
        "n_test": int(x.shape[0]),  # images scored
        "n_test_total": total,  # images in the test split
        "test_subset": "all" if subset is None else f"uniform random, seed {seed}",
    }


@torch.inference_mode()
def artifact_metrics(module, x: Tensor, *, k: int, num_dims: int, seed: int = 0, n: Optional[int] = None,
                     batch_size: int = 256, max_rows: int = MAX_ROWS, progress: bool = False) -> Dict[str, float]:
    """``test_metrics`` of a written artifact, through its own ``encode`` and ``score`` (what is served): the
    same test subset, the same noise drawn in the same order, so a freshly exported artifact reproduces the
    numbers training recorded (to float rounding). K is drawn in chunks and merged like ``importance_weighted``.
    """
    total = int(x.shape[0])
    subset = test_subset(total, n, seed)
    if subset is not None:
        x = x[torch.from_numpy(subset)]
    device = torch.device("cpu")  # where load_artifact puts a module by default
    gen = torch.Generator(device).manual_seed(seed)
    iw_ll, elbo, mus = [], [], []
    bar = tqdm(total=int(x.shape[0]), desc=f"test IW-NLL (K={k})", unit="img", leave=False, disable=not progress,
               dynamic_ncols=True)
    with bar:
        for xb in _batches(x, batch_size):
            xb = xb.to(device)
            b = xb.shape[0]
            mu, _ = module.encode(xb)
            d = mu.shape[1]
            chunk = max(1, max_rows // b)
            running = torch.full((b,), -math.inf, dtype=torch.float64, device=device)
            elbo_sum = torch.zeros(b, dtype=torch.float64, device=device)
            for start in range(0, k, chunk):
                k_c = min(chunk, k - start)
                eps = torch.randn(k_c, b, d, generator=gen, device=device)
                _, elbo_c, _, _, log_w = module.score(xb, eps)  # log_w (k_c, B)
                running = torch.logaddexp(running, torch.logsumexp(log_w.double(), dim=0))
                elbo_sum += k_c * elbo_c.double()  # each chunk's ELBO is a mean over its own samples
            iw_ll.append((running - math.log(k)).cpu())
            elbo.append((elbo_sum / k).cpu())
            mus.append(mu.cpu())
            bar.update(b)
    nll_mean, nll_se = _mean_se(-torch.cat(iw_ll).numpy())
    elbo_mean, elbo_se = _mean_se(torch.cat(elbo).numpy())
    mu_all = torch.cat(mus)
    return {
        "test_elbo_nats": elbo_mean, "test_elbo_se": elbo_se, "iw_nll_nats": nll_mean, "iw_nll_se": nll_se,
        "iw_k": k, "elbo_bits_per_dim": objectives.bits_per_dim(-elbo_mean, num_dims),
        "iw_nll_bits_per_dim": objectives.bits_per_dim(nll_mean, num_dims),
        "iw_nll_bits_per_dim_se": objectives.bits_per_dim(nll_se, num_dims),
        "active_units": active_units(mu_all), "latent_dim": int(mu_all.shape[1]), "n_test": int(x.shape[0]),
        "n_test_total": total, "test_subset": "all" if subset is None else f"uniform random, seed {seed}",
    }


@torch.inference_mode()
def posterior_means(vae: VAE, x: Tensor, device: torch.device, batch_size: int = 1024) -> Tensor:
    """E_q[z|x] for every image, (N, D) on the CPU."""
    with _EvalMode(vae):
        return torch.cat([vae.encode(vae.quantize(xb.to(device)))[0].cpu() for xb in _batches(x, batch_size)])


@torch.inference_mode()
def anomaly_scores(vae: VAE, x: Tensor, device: torch.device, *, k: int, noise_seed: int = 0,
                   max_rows: int = MAX_ROWS) -> List[float]:
    """Anomaly score (-IW log-likelihood, nats) of every image, in order, computed exactly as the service
    does: the exported ``score(x, eps)`` method with the contract's noise for every row."""
    serving = ServingModule(vae)
    eps = noise.scoring_noise(k, vae.config.latent_dim, noise_seed).to(device)
    scores: List[float] = []
    with _EvalMode(vae):
        for xb in _batches(x, max(1, max_rows // k)):
            iw_ll = serving.score(xb.to(device), noise.for_rows(eps, xb.shape[0]))[0]
            scores.extend((-iw_ll).cpu().tolist())
    return scores


def calibration_scores(vae: VAE, x: Tensor, device: torch.device, *, k: int, noise_seed: int = 0) -> List[float]:
    """Sorted anomaly scores of the held-out calibration images (what p-values are computed against)."""
    return sorted(anomaly_scores(vae, x, device, k=k, noise_seed=noise_seed))


if __name__ == "__main__":  # python -m training.evaluate ood: now python -m training ood protocols
    from training.aliases import forward

    forward("training.evaluate ood", ["ood", "protocols"], sys.argv[2:] if sys.argv[1:2] == ["ood"] else sys.argv[1:])
