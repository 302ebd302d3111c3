"""A convolutional VAE sized from the image shape.

q(z|x) is a diagonal Gaussian (mean and log-variance from the encoder), p(z) is N(0, I) or the VampPrior
(``training.priors``: a mixture of the encoder's posteriors at learned pseudo-inputs), and p(x|z) is
either a Bernoulli (binarised data) or a logistic discretised into the data's pixel levels (8-bit or
fewer), or a mixture of such logistics per pixel (``mixture``), so every likelihood the model reports is a
true discrete NLL. The encoder halves the image with strided convolutions while the side stays even and at
least 8 (28 -> 14 -> 7, 32 -> ... -> 4, 8 -> 4); the decoder mirrors it with transposed convolutions, so any
such shape round-trips exactly.

Two layouts (``VAEConfig.arch``). ``full``: a 3x3 convolution at full resolution before the first stride-2
step and after the last transposed one (the only layout before there was a choice, so configs without
``arch`` mean it). ``lean``: the stride-2 convolution reads the image itself and the last transposed
convolution writes p(x|z)'s parameters, so no layer runs at full resolution with ``base_width`` channels:
those two layers held most of the activations (and of the time) of a 28x28 model.
"""

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from training import objectives, priors

LIKELIHOODS = ("logistic", "bernoulli")
ARCHS = ("full", "lean")


@dataclass
class VAEConfig:
    channels: int = 1
    height: int = 28
    width: int = 28
    latent_dim: int = 16
    base_width: int = 32  # channels after the stem; doubles with each downsampling, capped at 4x
    hidden: int = 256  # width of the fully connected layer between the conv stack and the latent
    likelihood: str = "logistic"  # "logistic" (discretised, for 8-bit data) or "bernoulli" (binarised data)
    levels: int = 256  # pixel levels the discretised logistic spreads its mass over (17 for sklearn digits)
    prior: str = "standard"  # "standard" (N(0, I)) or "vamp" (Tomczak & Welling 2018)
    pseudo_inputs: int = 0  # the VampPrior's mixture components; 0 with the standard prior
    arch: str = "full"  # "full" or "lean" (module docstring); "full" is what configs from before the choice mean
    mixture: int = 1  # discretised logistics per pixel: 1, or a mixture of this many (logistic likelihood only)

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if min(self.height, self.width) < 4:
            raise ValueError(f"image must be at least 4x4, got {self.height}x{self.width}")
        if self.latent_dim < 1 or self.base_width < 1 or self.hidden < 1:
            raise ValueError(
                f"latent_dim, base_width, hidden must be positive, got "
                f"{self.latent_dim}, {self.base_width}, {self.hidden}"
            )
        if self.likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {self.likelihood!r}")
        if not 2 <= self.levels <= 65536:
            raise ValueError(f"levels must be in [2, 65536], got {self.levels}")
        if self.mixture < 1 or (self.mixture > 1 and self.likelihood != "logistic"):
            raise ValueError(f"mixture must be >= 1, and 1 with the {self.likelihood} likelihood; "
                             f"got {self.mixture}")
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        if self.arch == "lean" and not downsampling_plan(self.height, self.width):
            raise ValueError(f"the lean layout needs a stride-2 step (sides even and >= 8), got {self.height}x{self.width}")
        if self.prior not in priors.PRIORS:
            raise ValueError(f"prior must be one of {priors.PRIORS}, got {self.prior!r}")
        if (self.prior == "vamp") != (self.pseudo_inputs >= 1) or self.pseudo_inputs < 0:
            raise ValueError(f"pseudo_inputs must be >= 1 with the vamp prior and 0 otherwise, got "
                             f"{self.pseudo_inputs} with prior {self.prior!r}")

    @property
    def num_dims(self) -> int:
        return self.channels * self.height * self.width


def downsampling_plan(height: int, width: int) -> List[Tuple[int, int]]:
    """Spatial sizes after each stride-2 step: halve while both sides are even and >= 8."""
    sizes = []
    while height % 2 == 0 and width % 2 == 0 and min(height, width) >= 8:
        height, width = height // 2, width // 2
        sizes.append((height, width))
    return sizes


def layer_widths(config: VAEConfig) -> List[int]:
    """Channels at each resolution the conv stack visits, full resolution first. ``full``: base_width at full
    resolution, doubling with each stride-2 step; ``lean``: no full-resolution layer, base_width after the
    first step. Capped at 4 x base_width either way."""
    n = len(downsampling_plan(config.height, config.width)) + (1 if config.arch == "full" else 0)
    return [min(config.base_width * 2**i, 4 * config.base_width) for i in range(n)]


class Encoder(nn.Module):
    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        steps = downsampling_plan(config.height, config.width)
        widths = layer_widths(config)
        layers: List[nn.Module] = []
        if config.arch == "full":  # a 3x3 stem at full resolution
            layers += [nn.Conv2d(config.channels, widths[0], 3, padding=1), nn.SiLU()]
        else:  # the first stride-2 convolution reads the image
            widths = [config.channels] + widths
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), nn.SiLU()]
        self.conv = nn.Sequential(*layers)
        h, w = steps[-1] if steps else (config.height, config.width)
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(widths[-1] * h * w, config.hidden),
            nn.SiLU(),
            nn.Linear(config.hidden, 2 * config.latent_dim),
        )

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        mu, logvar = self.head(self.conv(x)).chunk(2, dim=1)  # (B, 2D) -> 2 x (B, D)
        # Bounded log-variance keeps exp() finite on inputs far from the training data.
        return mu, torch.clamp(logvar, -30.0, 20.0)


class Decoder(nn.Module):
    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        steps = downsampling_plan(config.height, config.width)
        widths = layer_widths(config)
        params_per_pixel = params_per_pixel_of(config)
        if config.arch == "lean":  # the last transposed convolution writes p(x|z)'s parameters
            widths = [params_per_pixel * config.channels] + widths
        h, w = steps[-1] if steps else (config.height, config.width)
        self.start_shape = (widths[-1], h, w)
        self.fc = nn.Sequential(
            nn.Linear(config.latent_dim, config.hidden),
            nn.SiLU(),
            nn.Linear(config.hidden, widths[-1] * h * w),
            nn.SiLU(),
        )
        layers: List[nn.Module] = []
        for c_in, c_out in zip(widths[:0:-1], widths[-2::-1]):
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1), nn.SiLU()]
        if config.arch == "full":  # a 3x3 head at full resolution
            layers.append(nn.Conv2d(widths[0], params_per_pixel * config.channels, 3, padding=1))
        else:
            layers.pop()  # no activation after the layer that writes the parameters
        self.conv = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        c, h, w = self.start_shape
        return self.conv(self.fc(z).view(-1, c, h, w))  # (B, D) -> (B, c, h, w) -> (B, P*C, H, W)


class VAE(nn.Module):
    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        self.likelihood = config.likelihood
        self.levels = config.levels
        self.channels = config.channels
        self.mixture = config.mixture
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        # None with the standard prior: TorchScript then compiles only the N(0, I) branches below.
        self.vamp = priors.PseudoInputs(config.pseudo_inputs, config.channels, config.height, config.width) \
            if config.prior == "vamp" else None

    def encode(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        return self.encoder(x)

    def reparameterize(self, mu: Tensor, logvar: Tensor, eps: Tensor) -> Tensor:
        """z = mu + sigma * eps, differentiable in mu and logvar; the caller owns the noise."""
        return mu + eps * torch.exp(0.5 * logvar)

    def decode_params(self, z: Tensor) -> Tensor:
        """Parameters of p(x|z): logits (B, C, H, W), or loc and log-scale stacked on channels (B, 2C, H, W), or
        with a mixture of M logistics, weight logits, locs and log-scales (B, 3MC, H, W)."""
        return self.decoder(z)

    def log_px_z(self, x: Tensor, params: Tensor) -> Tensor:
        """log p(x|z) per sample, summed over pixels -> (B,)."""
        params = params.float()  # under CUDA autocast the decoder hands out bf16/fp16; sum in float32
        if self.likelihood == "bernoulli":
            return objectives.bernoulli_log_prob(x, params)
        if self.mixture > 1:
            logit_weights, loc, log_scale = self._mixture_params(params)
            return objectives.discretized_logistic_mixture_log_prob(x, logit_weights, loc, log_scale, self.levels)
        loc, log_scale = self._logistic_params(params)
        return objectives.discretized_logistic_log_prob(x, loc, log_scale, self.levels)

    def mean(self, params: Tensor) -> Tensor:
        """Pixel means in [0, 1] from decoder parameters."""
        if self.likelihood == "bernoulli":
            return torch.sigmoid(params)
        if self.mixture > 1:  # the weighted mean of the components' locations
            logit_weights, loc, _ = self._mixture_params(params)
            return (torch.softmax(logit_weights, dim=1) * loc).sum(dim=1)
        loc, _ = self._logistic_params(params)
        return loc

    def decode(self, z: Tensor) -> Tensor:
        return self.mean(self.decode_params(z))

    def quantize(self, x: Tensor) -> Tensor:
        """Map any x in [0, 1] onto the data's support: {0, 1} for Bernoulli, the level grid otherwise."""
        x = torch.clamp(x, 0.0, 1.0)
        if self.likelihood == "bernoulli":
            return (x > 0.5).to(x.dtype)
        return torch.round(x * (self.levels - 1)) / (self.levels - 1)

    def forward(self, x: Tensor, eps: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
        """One-sample ELBO pieces: (log p(x|z) (B,), KL terms, mu (B, D)); ELBO = rec - KL terms summed.

        KL terms: the closed form per latent dim (B, D) under N(0, I); under the VampPrior, whose KL has no
        closed form, the one-sample estimate log q(z|x) - log p(z) at this z, (B, 1).
        """
        mu, logvar = self.encode(x)
        if eps is None:
            eps = torch.randn_like(mu)
        z = self.reparameterize(mu, logvar, eps)
        return self.log_px_z(x, self.decode_params(z)), self.kl_terms(z, mu, logvar), mu

    def kl_terms(self, z: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
        """KL(q(z|x) || p(z)) in float32 (autocast may hand out bf16): (B, D) closed form, or (B, 1) estimate."""
        mu, logvar = mu.float(), logvar.float()
        if self.vamp is not None:
            z = z.float()
            return (objectives.log_normal(z, mu, logvar) - self.log_prior(z)).unsqueeze(1)
        return objectives.kl_per_dim(mu, logvar)

    def prior_components(self) -> Tuple[Tensor, Tensor]:
        """The VampPrior's components: the encoder's (mu_k, logvar_k) at the pseudo-inputs, 2 x (N, D)."""
        vamp = self.vamp
        assert vamp is not None, "prior_components needs the vamp prior"
        mu, logvar = self.encoder(vamp())
        return mu.float(), logvar.float()

    def log_prior(self, z: Tensor) -> Tensor:
        """log p(z), exact, (..., D) -> (...). The VampPrior's components are recomputed from the current
        pseudo-inputs and encoder, so gradients reach both."""
        if self.vamp is not None:
            mu_k, logvar_k = self.prior_components()
            return priors.mixture_log_prob(z, mu_k, logvar_k)
        return objectives.log_standard_normal(z)

    def sample_latents(self, n: int, generator: torch.Generator) -> Tensor:
        """n draws from the prior p(z), (n, D) on the generator's device: eps, or a uniform component's
        mu_k + sigma_k * eps under the VampPrior (eager only; the artifact's ``sample_prior`` serves)."""
        eps = torch.randn(n, self.config.latent_dim, generator=generator, device=generator.device)
        if self.vamp is None:
            return eps
        component = torch.randint(0, self.config.pseudo_inputs, (n,), generator=generator, device=generator.device)
        mu_k, logvar_k = self.prior_components()
        return mu_k[component] + torch.exp(0.5 * logvar_k[component]) * eps

    def importance_samples(self, x: Tensor, eps: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """z (K, B, D) = mu + sigma * eps for noise eps (K, B, D), and log p(x|z_k) (K, B), mu, logvar.
        Every row uses only its own noise, so a row's result does not depend on what else is in the batch."""
        mu, logvar = self.encode(x)
        k, b, d = eps.shape
        z = self.reparameterize(mu.unsqueeze(0), logvar.unsqueeze(0), eps)  # (K, B, D)
        params = self.decode_params(z.reshape(k * b, d))  # (K*B, P*C, H, W)
        c, h, w = x.shape[1], x.shape[2], x.shape[3]
        x_rep = x.unsqueeze(0).expand(k, b, c, h, w).reshape(k * b, c, h, w)
        return z, self.log_px_z(x_rep, params).view(k, b), mu, logvar

    def importance_weights(self, x: Tensor, eps: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """K-sample importance weights for x (B, C, H, W) given noise eps (K, B, D): (log_w (K, B),
        log p(x|z_k) (K, B), mu, logvar), with the exact log p(z) of this model's prior."""
        z, log_px_z, mu, logvar = self.importance_samples(x, eps)
        return objectives.importance_log_weights(log_px_z, self.log_prior(z), z, mu, logvar), log_px_z, mu, logvar

    def _logistic_params(self, params: Tensor) -> Tuple[Tensor, Tensor]:
        raw_loc, raw_log_scale = params.chunk(2, dim=1)  # (B, 2C, H, W) -> 2 x (B, C, H, W)
        # A sigmoid keeps the location inside [0, 1]; the edge bins still reach the extremes exactly.
        # The floor on the log-scale stops a single pixel from claiming unbounded density.
        return torch.sigmoid(raw_loc), torch.clamp(raw_log_scale, min=-7.0)

    def _mixture_params(self, params: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """(B, 3MC, H, W) -> weight logits, locations in [0, 1], floored log-scales, each (B, M, C, H, W)."""
        b, h, w = params.shape[0], params.shape[2], params.shape[3]
        logit_weights, raw_loc, raw_log_scale = params.view(b, 3, self.mixture, self.channels, h, w).unbind(1)
        return logit_weights, torch.sigmoid(raw_loc), torch.clamp(raw_log_scale, min=-7.0)


def params_per_pixel_of(config: VAEConfig) -> int:
    """Decoder outputs per pixel and channel: a logit (Bernoulli), loc and log-scale (one logistic), or a
    weight logit, loc and log-scale per component (a mixture)."""
    if config.likelihood == "bernoulli":
        return 1
    return 2 if config.mixture == 1 else 3 * config.mixture


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def active_units(mu: Tensor, threshold: float = 1e-2) -> int:
    """Latent dims whose posterior mean varies across data: Cov_x(E_q[z_d]) > threshold (Burda et al. 2016)."""
    assert mu.dim() == 2, f"expected (N, D) posterior means, got shape {tuple(mu.shape)}"
    return int((mu.var(dim=0) > threshold).sum().item())
