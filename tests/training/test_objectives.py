"""The VAE's objectives: closed-form KL, reparameterised gradients, likelihoods, the loss and the bounds."""

import math

import pytest
import torch

from training import objectives
from training.model import VAE, VAEConfig


def test_kl_closed_form_matches_monte_carlo():
    gen = torch.Generator().manual_seed(0)
    mu = torch.tensor([[0.0, 0.0, 0.0], [1.5, -0.7, 0.2], [-2.0, 0.3, 3.0]], dtype=torch.float64)
    logvar = torch.tensor([[0.0, 0.0, 0.0], [-1.0, 0.5, -2.5], [1.0, -0.3, 0.0]], dtype=torch.float64)
    n = 200_000
    z = mu + torch.exp(0.5 * logvar) * torch.randn(n, *mu.shape, generator=gen, dtype=torch.float64)
    # KL = E_q[log q(z) - log p(z)]; estimate it from n samples per row.
    log_ratio = objectives.log_normal(z, mu, logvar) - objectives.log_standard_normal(z)  # (n, B)
    mc, se = log_ratio.mean(dim=0), log_ratio.std(dim=0) / math.sqrt(n)
    closed = objectives.kl_standard_normal(mu, logvar)
    assert closed[0].item() == pytest.approx(0.0, abs=1e-12)  # q = p
    assert torch.all((closed - mc).abs() <= 4 * se + 1e-9), (closed, mc, se)
    assert torch.allclose(objectives.kl_per_dim(mu, logvar).sum(dim=1), closed)


def test_gradients_reach_the_encoder_through_the_reparameterised_sample():
    torch.manual_seed(0)
    vae = VAE(VAEConfig(channels=1, height=8, width=8, latent_dim=4, base_width=8, hidden=32, levels=17))
    x = torch.randint(0, 17, (5, 1, 8, 8)).float() / 16
    eps = torch.randn(5, 4)
    rec, _, _ = vae(x, eps)  # the reconstruction term alone: the encoder only enters through z
    rec.sum().backward()
    for name, p in vae.encoder.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name

    mu = torch.zeros(3, requires_grad=True)
    logvar = torch.full((3,), math.log(4.0), requires_grad=True)
    e = torch.tensor([1.0, -2.0, 0.5])
    vae.reparameterize(mu, logvar, e).sum().backward()
    assert torch.allclose(mu.grad, torch.ones(3))  # dz/dmu = 1
    assert torch.allclose(logvar.grad, 0.5 * e * 2.0)  # dz/dlogvar = eps * sigma / 2, sigma = 2


@pytest.mark.parametrize("levels", [2, 17, 256])
@pytest.mark.parametrize("loc", [0.0, 0.37, 1.0, -0.5, 1.8])
@pytest.mark.parametrize("log_scale", [-7.0, -3.0, 0.0, 3.0])
def test_discretized_logistic_sums_to_one_over_all_levels(levels, loc, log_scale):
    x = (torch.arange(levels, dtype=torch.float32) / (levels - 1)).view(levels, 1, 1, 1)
    log_p = objectives.discretized_logistic_log_prob(
        x, torch.full_like(x, loc), torch.full_like(x, log_scale), levels)
    assert log_p.shape == (levels,)
    assert torch.all(log_p <= 1e-6)
    assert torch.logsumexp(log_p.double(), dim=0).exp().item() == pytest.approx(1.0, abs=1e-4)


def test_discretized_logistic_matches_the_cdf_difference():
    levels, loc, scale = 17, 0.4, 0.1
    k = 7
    x = torch.full((1, 1, 1, 1), k / (levels - 1))
    got = objectives.discretized_logistic_log_prob(x, torch.full_like(x, loc), torch.full_like(x, math.log(scale)),
                                                   levels).item()
    cdf = lambda v: 1.0 / (1.0 + math.exp(-(v - loc) / scale))  # noqa: E731
    half = 0.5 / (levels - 1)
    assert got == pytest.approx(math.log(cdf(k / 16 + half) - cdf(k / 16 - half)), rel=1e-5)


def test_bernoulli_log_prob_matches_hand_computation():
    x = torch.tensor([[1.0, 0.0, 1.0, 0.0]]).view(1, 1, 2, 2)
    logits = torch.tensor([[0.0, 2.0, -1.0, -3.0]]).view(1, 1, 2, 2)
    sig = lambda a: 1.0 / (1.0 + math.exp(-a))  # noqa: E731
    expected = math.log(sig(0.0)) + math.log(1 - sig(2.0)) + math.log(sig(-1.0)) + math.log(1 - sig(-3.0))
    assert objectives.bernoulli_log_prob(x, logits).item() == pytest.approx(expected, rel=1e-6)


def test_beta_vae_loss_is_negative_elbo_and_free_bits_floor_the_kl():
    rec = torch.tensor([-10.0, -20.0])
    kl_dims = torch.tensor([[0.5, 0.01], [1.5, 0.03]])
    elbo = rec - kl_dims.sum(dim=1)
    assert objectives.beta_vae_loss(rec, kl_dims, 1.0, 0.0).item() == pytest.approx(-elbo.mean().item())
    assert objectives.beta_vae_loss(rec, kl_dims, 0.0, 0.0).item() == pytest.approx(15.0)
    # dim 2's mean KL (0.02) is below the 0.25-nat floor, dim 1's (1.0) is not.
    assert objectives.beta_vae_loss(rec, kl_dims, 2.0, 0.25).item() == pytest.approx(15.0 + 2.0 * (1.0 + 0.25))


def test_iw_bound_with_one_sample_is_the_log_weight_and_grows_with_equal_weights():
    log_w = torch.tensor([[-3.0, -5.0]])
    assert torch.equal(objectives.iw_bound(log_w), log_w[0])
    assert torch.allclose(objectives.iw_bound(log_w.expand(10, 2)), log_w[0])  # equal weights: no gain
    assert objectives.iw_bound(torch.tensor([[0.0], [-100.0]])).item() == pytest.approx(-math.log(2), abs=1e-6)


def test_bits_per_dim():
    assert objectives.bits_per_dim(64 * math.log(2.0), 64) == pytest.approx(1.0)


@pytest.mark.parametrize("levels", [2, 17, 256])
def test_discretized_logistic_mixture_is_the_weighted_sum_of_its_components(levels):
    """Per pixel, P(x) = sum_m w_m P_m(x) with w = softmax(logits), computed independently in float64 from the
    single-logistic function; the mixture's bin probabilities sum to one; one component is the single logistic."""
    gen = torch.Generator().manual_seed(0)
    x = (torch.randint(0, levels, (2, 1, 3, 3), generator=gen).double() / (levels - 1))
    logits, loc = torch.randn(2, 3, 1, 3, 3, generator=gen).double(), torch.rand(2, 3, 1, 3, 3, generator=gen).double()
    log_scale = torch.randn(2, 3, 1, 3, 3, generator=gen).double() * 2 - 2
    got = objectives.discretized_logistic_mixture_log_prob(x, logits, loc, log_scale, levels)
    weights = torch.softmax(logits, dim=1)
    per_pixel = sum(weights[:, m] * objectives.discretized_logistic_log_probs(x, loc[:, m], log_scale[:, m],
                                                                              levels).exp() for m in range(3))
    assert torch.allclose(got, per_pixel.log().flatten(1).sum(dim=1), rtol=1e-10)

    grid = (torch.arange(levels, dtype=torch.float64) / (levels - 1)).view(levels, 1, 1, 1)
    one = lambda t: t[:1, :, :1, :1, :1].expand(levels, 3, 1, 1, 1)  # noqa: E731  one pixel's mixture, every level
    log_p = objectives.discretized_logistic_mixture_log_prob(grid, one(logits), one(loc), one(log_scale), levels)
    assert torch.logsumexp(log_p, dim=0).exp().item() == pytest.approx(1.0, abs=1e-9)

    single = objectives.discretized_logistic_mixture_log_prob(x, logits[:, :1], loc[:, :1], log_scale[:, :1], levels)
    assert torch.allclose(single, objectives.discretized_logistic_log_prob(x, loc[:, 0], log_scale[:, 0], levels))
