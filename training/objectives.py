"""The VAE's objectives: likelihoods, closed-form KL, the ELBO and the importance-weighted bound.

Every function is pure and returns **per-sample** values (shape ``(B,)``, summed over pixels and latent
dimensions) in nats; callers take means. Log-likelihoods are positive-is-better, losses negative.
All of them are TorchScript-compatible so the exported artifact runs exactly this code.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def kl_standard_normal(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) per sample, summed over latent dims -> (B,).

    Closed form from Kingma & Welling (2014), Appendix B: -1/2 * sum(1 + logvar - mu^2 - exp(logvar)).
    """
    return -0.5 * torch.sum(1.0 + logvar - mu.pow(2) - logvar.exp(), dim=1)


def kl_per_dim(mu: Tensor, logvar: Tensor) -> Tensor:
    """The same KL, unsummed: (B, D). Free bits and the active-units count need it per dimension."""
    return -0.5 * (1.0 + logvar - mu.pow(2) - logvar.exp())


def log_normal(z: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """log N(z; mu, exp(logvar)) summed over the last dim (broadcasts over leading dims)."""
    return -0.5 * torch.sum(math.log(2.0 * math.pi) + logvar + (z - mu).pow(2) * torch.exp(-logvar), dim=-1)


def log_standard_normal(z: Tensor) -> Tensor:
    """log N(z; 0, I) summed over the last dim."""
    return -0.5 * torch.sum(math.log(2.0 * math.pi) + z.pow(2), dim=-1)


def bernoulli_log_prob(x: Tensor, logits: Tensor) -> Tensor:
    """log p(x | logits) for binary x, summed over (C, H, W) -> (B,)."""
    nll = F.binary_cross_entropy_with_logits(logits, x, reduction="none")
    return -nll.flatten(1).sum(dim=1)


def discretized_logistic_log_prob(x: Tensor, loc: Tensor, log_scale: Tensor, levels: int) -> Tensor:
    """log P(x) under a logistic discretised into ``levels`` equal bins on [0, 1], summed -> (B,).

    x holds bin centres k / (levels - 1). The edge bins absorb the tails (to -inf and +inf), so the
    probabilities of all bins sum to one and the result is a true discrete log-likelihood — the one
    PixelCNN++ (Salimans et al. 2017) uses, here for `levels` bins instead of 256.
    """
    return discretized_logistic_log_probs(x, loc, log_scale, levels).flatten(1).sum(dim=1)


def discretized_logistic_mixture_log_prob(x: Tensor, logit_weights: Tensor, loc: Tensor, log_scale: Tensor,
                                          levels: int) -> Tensor:
    """log P(x) per pixel under a mixture of M discretised logistics, summed -> (B,). x: (B, C, H, W);
    logit_weights, loc, log_scale: (B, M, C, H, W). Each pixel has its own mixture (PixelCNN++'s likelihood
    without the coupling between colour channels); the pixels are independent given z."""
    log_probs = discretized_logistic_log_probs(x.unsqueeze(1), loc, log_scale, levels)  # (B, M, C, H, W)
    mixed = torch.logsumexp(log_probs + F.log_softmax(logit_weights, dim=1), dim=1)
    return mixed.flatten(1).sum(dim=1)


def discretized_logistic_log_probs(x: Tensor, loc: Tensor, log_scale: Tensor, levels: int) -> Tensor:
    """The bin log-probabilities of :func:`discretized_logistic_log_prob`, per element (broadcast shape)."""
    half_bin = 0.5 / (levels - 1)
    inv_scale = torch.exp(-log_scale)
    centered = x - loc
    cdf_plus = torch.sigmoid((centered + half_bin) * inv_scale)
    cdf_minus = torch.sigmoid((centered - half_bin) * inv_scale)
    # log sigma(a) = a - softplus(a); log(1 - sigma(b)) = -softplus(b): stable at both edges.
    log_cdf_plus = (centered + half_bin) * inv_scale - F.softplus((centered + half_bin) * inv_scale)
    log_one_minus_cdf_minus = -F.softplus((centered - half_bin) * inv_scale)
    mid = torch.log(torch.clamp(cdf_plus - cdf_minus, min=1e-12))
    # Far in a tail the bin mass underflows; use the density at the centre times the bin width instead.
    mid_in = centered * inv_scale
    log_pdf_mid = mid_in - log_scale - 2.0 * F.softplus(mid_in)
    mid = torch.where(cdf_plus - cdf_minus > 1e-5, mid, log_pdf_mid + math.log(2.0 * half_bin))
    eps = 1e-3 * half_bin
    return torch.where(x < eps, log_cdf_plus, torch.where(x > 1.0 - eps, log_one_minus_cdf_minus, mid))


def beta_vae_loss(rec: Tensor, kl_dims: Tensor, beta: float, free_bits: float) -> Tensor:
    """Mean over the batch of -(rec - beta * KL), the training loss (a per-sample mean, in nats).

    Free bits (Kingma et al. 2016): each latent dim's batch-mean KL is floored at ``free_bits`` nats, so
    the optimiser gains nothing by collapsing a dim below it. With free_bits=0 and beta=1 this is -ELBO.
    """
    kl_mean_per_dim = kl_dims.mean(dim=0)
    if free_bits > 0.0:
        kl_mean_per_dim = torch.clamp(kl_mean_per_dim, min=free_bits)
    return -rec.mean() + beta * kl_mean_per_dim.sum()


def importance_log_weights(log_px_z: Tensor, log_pz: Tensor, z: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """log w_k = log p(x|z_k) + log p(z_k) - log q(z_k|x) for z: (K, B, D) -> (K, B); ``log_pz`` (K, B) is the
    prior's log-density at z (``log_standard_normal(z)`` for N(0, I))."""
    return log_px_z + log_pz - log_normal(z, mu.unsqueeze(0), logvar.unsqueeze(0))


def iw_bound(log_w: Tensor, dim: int = 0) -> Tensor:
    """The K-sample importance-weighted bound (Burda et al. 2016): logsumexp_k log w_k - log K, over the K
    samples along ``dim`` (0 for (K, B) weights, 1 for (B, K) rows) -> (B,)."""
    return torch.logsumexp(log_w, dim=dim) - math.log(log_w.shape[dim])


def bits_per_dim(nll_nats: Tensor | float, num_dims: int) -> Tensor | float:
    """Convert a per-image NLL in nats into bits per dimension (pixel x channel)."""
    return nll_nats / (num_dims * math.log(2.0))
