"""The scoring noise: what makes the same image always get the same anomaly score.

Every score, at training time (calibration), in evaluation and in the service, calls the artifact's
``score(x, eps)`` with ``eps`` = one (K, D) draw of ``randn`` from a CPU generator seeded with the artifact's
``scoring.noise_seed``, broadcast to every row: (K, D) -> (K, B, D). Rows never mix inside ``score``, so a
row gets the same numbers alone or in any batch, and calibration scores are exchangeable with served ones.
"""

import torch

from vae_artifact.metadata import DEFAULT_K

__all__ = ["DEFAULT_K", "DESCRIPTION", "for_rows", "scoring_noise"]
DESCRIPTION = ("torch.randn((K, D), generator=torch.Generator('cpu').manual_seed(noise_seed)) on CPU, "
               "shared by every row")


def scoring_noise(k: int, latent_dim: int, noise_seed: int) -> torch.Tensor:
    """(K, D) float32 on the CPU: the contract's noise for K importance samples."""
    if k < 1 or latent_dim < 1:
        raise ValueError(f"k and latent_dim must be >= 1, got k={k}, latent_dim={latent_dim}")
    return torch.randn((k, latent_dim), generator=torch.Generator("cpu").manual_seed(noise_seed))


def for_rows(noise: torch.Tensor, rows: int) -> torch.Tensor:
    """(K, D) -> (K, rows, D), the shape ``score`` takes; a view, no copy."""
    k, d = noise.shape
    return noise.unsqueeze(1).expand(k, rows, d)
