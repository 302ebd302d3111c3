"""The prior p(z): the standard normal N(0, I), or the VampPrior (Tomczak & Welling 2018).

The VampPrior is a uniform mixture of the encoder's own posteriors at N learned pseudo-inputs u_k,
p(z) = 1/N sum_k q(z | u_k). While training, the pseudo-inputs (``PseudoInputs``) move with the encoder, so
the model recomputes the components (mu_k, logvar_k) = encoder(u_k) every step. The exported artifact freezes
them (``Mixture``): its log-density is a logsumexp over the stored components and its sampler a gather, and
the standard normal (``StandardNormal``) has the same two methods, so the serving module reads the same for
both priors. Every function here is TorchScript-compatible.
"""

import math
import torch
from torch import Tensor, nn

from training import objectives

PRIORS = ("standard", "vamp")  # N(0, I); a mixture of posteriors at learned pseudo-inputs


def mixture_log_prob(z: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """log (1/N sum_k N(z; mu_k, exp(logvar_k))) for z (..., D) and components (N, D) -> (...).

    Each row of z is reduced on its own (over D, then over the N components, both the last dim of a
    contiguous tensor), so a row's value does not depend on how many rows share the call; no matrix product,
    whose kernel would change with the batch size. Memory is (rows, N, D).
    """
    log_components = objectives.log_normal(z.unsqueeze(-2), mu, logvar)  # (..., 1, D) vs (N, D) -> (..., N)
    return torch.logsumexp(log_components, dim=-1) - math.log(mu.shape[0])


class PseudoInputs(nn.Module):
    """The VampPrior's N learnable pseudo-inputs, kept in [0, 1] (pixel space) by a sigmoid of free logits."""

    def __init__(self, n: int, channels: int, height: int, width: int) -> None:
        super().__init__()
        if n < 1:
            raise ValueError(f"the VampPrior needs at least one pseudo-input, got {n}")
        # Near-grey start; ``initialise_from`` replaces it with training images when the trainer has data.
        self.logits = nn.Parameter(0.01 * torch.randn(n, channels, height, width))

    def forward(self) -> Tensor:
        return torch.sigmoid(self.logits)  # (N, C, H, W) in (0, 1)

    @torch.no_grad()
    def initialise_from(self, images: Tensor) -> None:
        """Start the pseudo-inputs at ``images`` (N, C, H, W) in [0, 1]: components on the data's posteriors
        from the first step, rather than N copies of the posterior of a grey image (Tomczak & Welling, Sec. 3)."""
        if images.shape != self.logits.shape:
            raise ValueError(f"expected {tuple(self.logits.shape)} images, got {tuple(images.shape)}")
        self.logits.copy_(torch.logit(images.clamp(0.05, 0.95)))  # clamp: the sigmoid must stay trainable


class StandardNormal(nn.Module):
    """p(z) = N(0, I) for the serving module: the log-density and the sampler (the noise itself)."""

    def log_prob(self, z: Tensor) -> Tensor:
        """log N(z; 0, I), (..., D) -> (...)."""
        return objectives.log_standard_normal(z)

    def sample(self, eps: Tensor, component: Tensor) -> Tensor:
        """z = eps; ``component`` is ignored (one component)."""
        return eps


class Mixture(nn.Module):
    """A frozen uniform mixture of diagonal Gaussians: the VampPrior with its components computed once."""

    def __init__(self, mu: Tensor, logvar: Tensor) -> None:
        super().__init__()
        assert mu.dim() == 2 and mu.shape == logvar.shape, f"components must be (N, D), got {mu.shape}, {logvar.shape}"
        self.register_buffer("mu", mu.detach().clone())
        self.register_buffer("logvar", logvar.detach().clone())
        self.register_buffer("std", torch.exp(0.5 * logvar.detach()))

    def log_prob(self, z: Tensor) -> Tensor:
        """The exact mixture density log p(z), (..., D) -> (...)."""
        return mixture_log_prob(z, self.mu, self.logvar)

    def sample(self, eps: Tensor, component: Tensor) -> Tensor:
        """z = mu_k + sigma_k * eps for eps (B, D) ~ N(0, I) and component indices k (B,) int64, chosen
        uniformly by the caller: a draw from the mixture, decided entirely by the caller's noise."""
        return self.mu[component] + self.std[component] * eps
