"""Latent-space geometry for /sample, /encode?sample=true and /interpolate (numpy, seeded).

Samples of a mixture prior (the VampPrior) take two steps: ``mixture_noise`` draws each sample's noise and
component from the seed here, and the artifact's ``sample_prior`` maps them to z (the runtime's ``prior``
kernel), so the same seed gives the same z with any prior, and the prior's math stays in the artifact.
"""

import numpy as np

METHODS = ("linear", "slerp")


def prior_sample(n: int, dim: int, seed: int, temperature: float = 1.0) -> np.ndarray:
    """z ~ N(0, temperature^2 I), (n, dim) float32; depends only on (n, dim, seed, temperature)."""
    return (temperature * np.random.default_rng(seed).standard_normal((n, dim))).astype(np.float32)


def mixture_noise(n: int, dim: int, components: int, seed: int, temperature: float = 1.0) -> np.ndarray:
    """Rows for the artifact's ``sample_prior``: (n, dim + 1) float32, each eps * temperature (dim) and then
    a component index drawn uniformly from [0, components). eps is ``prior_sample``'s draw for the same seed.

    Temperature, for a mixture: it scales every component's standard deviation (z = mu_k + T sigma_k eps),
    not the spread of the component means; T = 1 samples the prior itself.
    """
    if not 1 <= components <= 2**24:  # indices travel as float32, exact up to 2**24
        raise ValueError(f"components must be in [1, 2**24], got {components}")
    rng = np.random.default_rng(seed)
    eps = temperature * rng.standard_normal((n, dim))
    component = rng.integers(0, components, size=(n, 1))
    return np.concatenate([eps, component], axis=1).astype(np.float32)


def posterior_sample(mu: np.ndarray, logvar: np.ndarray, seed: int) -> np.ndarray:
    """z = mu + exp(logvar / 2) * eps with eps drawn from ``seed``, (N, D) float32."""
    eps = np.random.default_rng(seed).standard_normal(mu.shape)
    return (mu + np.exp(0.5 * logvar) * eps).astype(np.float32)


def interpolate(a: np.ndarray, b: np.ndarray, steps: int, method: str) -> np.ndarray:
    """``steps`` latents from a to b inclusive, (steps, D) float32; the first is a and the last is b exactly.

    slerp (Shoemake 1985; White 2016 for generative models) follows the great circle between a and b, which
    keeps norms typical of the Gaussian prior; for (anti)parallel vectors it falls back to linear.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if steps < 2:
        raise ValueError(f"steps must be >= 2, got {steps}")
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    t = np.linspace(0.0, 1.0, steps)[:, None]
    path = (1.0 - t) * a64 + t * b64
    if method == "slerp":
        norms = np.linalg.norm(a64) * np.linalg.norm(b64)
        omega = np.arccos(np.clip(a64 @ b64 / norms, -1.0, 1.0)) if norms > 0 else 0.0
        if 1e-6 < omega < np.pi - 1e-6:
            path = (np.sin((1.0 - t) * omega) * a64 + np.sin(t * omega) * b64) / np.sin(omega)
    path = path.astype(np.float32)
    path[0], path[-1] = a, b  # exact end points, whatever the rounding above did
    return path
