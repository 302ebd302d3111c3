"""The prior p(z): the VampPrior's density and samples, the bounds under it, the artifact's prior methods and
metadata for both priors, and the CLI's refusal of bad prior options."""

import math

import numpy as np
import pytest
import torch

from training import evaluate, export, priors
from training.cli.train import parse_args
from training.data import to_float
from training.model import VAE, VAEConfig
from vae_artifact.errors import ArtifactError
from vae_artifact.io import load_artifact
from vae_artifact.metadata import PRIOR_METHODS, Metadata, read_metadata


def small_vae(prior: str = "vamp", pseudo_inputs: int = 7, seed: int = 0) -> VAE:
    torch.manual_seed(seed)
    return VAE(VAEConfig(channels=1, height=8, width=8, latent_dim=4, base_width=8, hidden=32, levels=17,
                         prior=prior, pseudo_inputs=pseudo_inputs if prior == "vamp" else 0))


def digits(digits_dataset, n: int) -> torch.Tensor:
    return to_float(digits_dataset.test.images[:n], digits_dataset.levels)


def brute_force_log_density(z: np.ndarray, mu: np.ndarray, logvar: np.ndarray) -> np.ndarray:
    """log (1/N sum_k prod_d N(z_d; mu_kd, var_kd)), one z at a time, in float64."""
    out = []
    for row in z:
        densities = [np.prod(np.exp(-0.5 * (row - m) ** 2 / np.exp(lv)) / np.sqrt(2 * np.pi * np.exp(lv)))
                     for m, lv in zip(mu, logvar)]
        out.append(np.log(np.mean(densities)))
    return np.array(out)


def test_vamp_log_density_is_the_mixture_of_the_encoders_posteriors_at_the_pseudo_inputs():
    vae = small_vae(pseudo_inputs=5)
    with torch.no_grad():
        mu_k, logvar_k = vae.encoder(vae.vamp())  # q(z | u_k) for every pseudo-input, by hand
        z = 1.5 * torch.randn(40, 4, generator=torch.Generator().manual_seed(1))
        model_value = vae.log_prior(z).double().numpy()
        frozen_value = priors.Mixture(mu_k, logvar_k).log_prob(z).double().numpy()
    expected = brute_force_log_density(z.double().numpy(), mu_k.double().numpy(), logvar_k.double().numpy())
    np.testing.assert_allclose(model_value, expected, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(frozen_value, expected, rtol=1e-5, atol=1e-4)
    # Leading dims broadcast, as the importance weights need ((K, B, D) -> (K, B)).
    assert torch.equal(vae.log_prior(z.view(4, 10, 4)).flatten(), vae.log_prior(z))


def test_mixture_density_integrates_to_one():
    mu = torch.tensor([[-2.0], [0.5], [3.0]], dtype=torch.float64)
    logvar = torch.tensor([[0.0], [-1.0], [0.5]], dtype=torch.float64)
    grid = torch.linspace(-15, 15, 30001, dtype=torch.float64).unsqueeze(1)
    mass = torch.exp(priors.mixture_log_prob(grid, mu, logvar)).sum() * (grid[1, 0] - grid[0, 0])
    assert float(mass) == pytest.approx(1.0, abs=1e-6)


def test_mixture_samples_follow_the_mixture():
    """Uniform components and N(0, I) noise from the caller: the samples have the mixture's mean and variance,
    and each component gets its share."""
    mu = torch.tensor([[-6.0, 0.0], [0.0, 5.0], [6.0, -1.0]])
    logvar = torch.log(torch.tensor([[0.25, 1.0], [1.0, 0.5], [0.5, 2.0]]))
    mixture = priors.Mixture(mu, logvar)
    gen = torch.Generator().manual_seed(0)
    n = 30000
    component = torch.randint(0, 3, (n,), generator=gen)
    z = mixture.sample(torch.randn(n, 2, generator=gen), component)
    mean = mu.mean(0)
    var = (logvar.exp() + mu.pow(2)).mean(0) - mean.pow(2)  # law of total variance, uniform weights
    se = (var / n).sqrt()
    assert torch.all((z.mean(0) - mean).abs() < 5 * se), (z.mean(0), mean)
    assert torch.allclose(z.var(0), var, rtol=0.05)
    nearest = torch.cdist(z, mu).argmin(dim=1)  # components this far apart: the nearest mean is the one drawn
    assert (nearest == component).float().mean() > 0.99
    shares = torch.bincount(component, minlength=3).float() / n
    assert torch.all((shares - 1 / 3).abs() < 0.02)
    # The sampler is the caller's noise mapped through the component: same noise, same samples.
    assert torch.equal(mixture.sample(torch.ones(3, 2), torch.arange(3)), mu + logvar.mul(0.5).exp())


def test_elbo_is_below_the_iw_bound_with_the_vamp_prior(digits_dataset):
    vae = small_vae(pseudo_inputs=10).eval()
    x = digits(digits_dataset, 64)
    out = evaluate.importance_weighted(vae, x, k=32, generator=torch.Generator().manual_seed(0))
    # With the same K samples the ELBO is their mean log weight, the bound their log-mean-exp (Jensen).
    assert torch.all(out["elbo"] <= out["iw_ll"] + 1e-9)
    # In expectation too: the one-sample training ELBO (with its one-sample KL) over many draws.
    draws, b = 32, x.shape[0]
    with torch.no_grad():  # every draw in one batch: the images repeated, fresh noise for each copy
        rec, kl, _ = vae(x.repeat(draws, 1, 1, 1), torch.randn(draws * b, 4, generator=torch.Generator().manual_seed(1)))
    assert kl.shape == (draws * b, 1)
    one_sample = (rec - kl.sum(dim=1)).double().view(draws, b)
    se = float(one_sample.mean(1).std() / math.sqrt(one_sample.shape[0]))
    assert float(one_sample.mean()) <= float(out["iw_ll"].mean()) + 3 * se
    # And the IW bound tightens with K (in expectation; the same holds image by image here).
    iw_1 = evaluate.importance_weighted(vae, x, k=1, generator=torch.Generator().manual_seed(2))["iw_ll"]
    assert float(iw_1.mean()) < float(out["iw_ll"].mean())


def test_training_moves_the_pseudo_inputs(digits_dataset):
    vae = small_vae(pseudo_inputs=6).train()
    x = digits(digits_dataset, 32)
    rec, kl, _ = vae(x, torch.randn(32, 4, generator=torch.Generator().manual_seed(0)))
    (kl.sum(dim=1) - rec).mean().backward()
    assert vae.vamp.logits.grad is not None and float(vae.vamp.logits.grad.abs().sum()) > 0


@pytest.mark.parametrize("prior", ["standard", "vamp"])
def test_export_round_trip_and_metadata(tmp_path, digits_dataset, prior):
    vae = small_vae(prior).eval()
    x = digits(digits_dataset, 8)
    path = tmp_path / "vae.ts"
    serving = export.ServingModule(vae)
    written = export.export_artifact(serving, path, export.build_metadata(serving, data={"name": "unit"}), check_x=x)
    module, meta = load_artifact(path)
    components = 7 if prior == "vamp" else 1
    assert (meta.prior.name, meta.prior.components) == (prior, components)
    assert read_metadata(path).prior == meta.prior and written["model"]["prior"]["methods"] == PRIOR_METHODS
    assert meta["model"]["config"]["prior"] == prior
    gen = torch.Generator().manual_seed(3)
    eps = torch.randn(5, 4, generator=gen)
    component = torch.randint(0, components, (5,), generator=gen)
    with torch.no_grad():
        z = module.sample_prior(eps, component)
        if prior == "vamp":
            mu_k, logvar_k = vae.encoder(vae.vamp())
            assert torch.allclose(z, mu_k[component] + torch.exp(0.5 * logvar_k[component]) * eps, atol=1e-6)
        else:
            assert torch.equal(z, eps)
        assert torch.allclose(module.prior_log_prob(z), vae.log_prior(z), atol=1e-4)
        # score's importance weights use exactly that density.
        iw, elbo, rec, kl, log_w = module.score(x, eps[:4].unsqueeze(1).expand(4, 8, 4).contiguous())
        eager = vae.importance_weights(vae.quantize(x), eps[:4].unsqueeze(1).expand(4, 8, 4))[0]
        assert torch.allclose(log_w, eager, atol=1e-3) and torch.all(elbo <= iw + 1e-4)


def test_older_artifacts_have_the_standard_prior():
    meta = read_metadata("tests/fixtures/vae_format1.ts")
    assert (meta.prior.name, meta.prior.components, meta.prior.is_standard) == ("standard", 1, True)
    assert "prior" not in meta["model"]  # read unchanged, nothing added to the document


@pytest.mark.parametrize("prior", [{"name": "gaussian"}, {"name": "vamp", "components": 0},
                                   {"name": "standard", "components": 3}, {"name": "vamp", "components": 2**25}])
def test_metadata_refuses_a_bad_prior(prior):
    document = read_metadata("tests/fixtures/vae_format1.ts").to_dict()
    document["model"]["prior"] = prior
    with pytest.raises(ArtifactError, match="model.prior"):
        Metadata.from_dict(document)


def test_model_config_checks_the_prior_and_old_configs_load():
    with pytest.raises(ValueError, match="prior must be one of"):
        VAEConfig(prior="gaussian")
    with pytest.raises(ValueError, match="pseudo_inputs"):
        VAEConfig(prior="vamp", pseudo_inputs=0)
    with pytest.raises(ValueError, match="pseudo_inputs"):
        VAEConfig(pseudo_inputs=3)
    old = {"channels": 1, "height": 8, "width": 8, "latent_dim": 4, "base_width": 8, "hidden": 32,
           "likelihood": "logistic", "levels": 17}  # a checkpoint's config from before the prior existed
    assert VAE(VAEConfig(**old)).vamp is None


@pytest.mark.parametrize("argv, message", [
    (["--prior", "gaussian"], "invalid choice: 'gaussian'"),
    (["--prior", "vamp", "--pseudo-inputs", "0"], "expected a positive integer"),
    (["--pseudo-inputs", "10"], "--pseudo-inputs needs --prior vamp"),
    (["--prior", "vamp", "--free-bits", "0.5"], "--free-bits needs a KL per latent dimension"),
    (["--eval-n", "-3"], "expected a number of images >= 0"),
    (["--eval-n", "some"], "expected a number of images or 'all'"),
])
def test_bad_prior_and_evaluation_options_are_usage_errors(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_prior_options_parse():
    assert parse_args(["--prior", "vamp"]).pseudo_inputs >= 1
    assert parse_args(["--prior", "vamp", "--pseudo-inputs", "25"]).pseudo_inputs == 25
    assert parse_args([]).prior == "standard" and parse_args([]).pseudo_inputs is None
    assert parse_args(["--eval-n", "all"]).eval_n == 0 and parse_args(["--eval-n", "500"]).eval_n == 500


def test_evaluation_on_a_random_subset_records_its_size_and_standard_error(digits_dataset):
    vae = small_vae("standard").eval()
    x = digits(digits_dataset, 120)
    some = evaluate.test_metrics(vae, x, torch.device("cpu"), k=4, seed=5, n=50)
    assert (some["n_test"], some["n_test_total"]) == (50, 120) and "seed 5" in some["test_subset"]
    assert some["iw_nll_se"] > 0
    assert some["iw_nll_bits_per_dim_se"] == pytest.approx(some["iw_nll_se"] / (64 * math.log(2)))
    whole = evaluate.test_metrics(vae, x, torch.device("cpu"), k=4, seed=5, n=0)
    assert (whole["n_test"], whole["test_subset"]) == (120, "all")
    assert evaluate.test_metrics(vae, x, torch.device("cpu"), k=4, seed=5, n=500)["n_test"] == 120
    # The subset is a function of the seed: the same images, the same numbers.
    again = evaluate.test_metrics(vae, x, torch.device("cpu"), k=4, seed=5, n=50)
    assert again["iw_nll_nats"] == some["iw_nll_nats"]
    assert abs(some["iw_nll_nats"] - whole["iw_nll_nats"]) < 5 * some["iw_nll_se"]


def test_eager_prior_samples_match_the_artifacts_sampler():
    """What the report's samples.png draws: the same mixture the artifact's sample_prior maps noise through."""
    standard = small_vae("standard")
    assert torch.equal(standard.sample_latents(6, torch.Generator().manual_seed(4)),
                       torch.randn(6, 4, generator=torch.Generator().manual_seed(4)))
    vamp = small_vae("vamp").eval()
    with torch.no_grad():
        z = vamp.sample_latents(6, torch.Generator().manual_seed(4))
        gen = torch.Generator().manual_seed(4)
        eps = torch.randn(6, 4, generator=gen)
        component = torch.randint(0, 7, (6,), generator=gen)
        expected = export.ServingModule(vamp).sample_prior(eps, component)
    assert torch.allclose(z, expected, atol=1e-6)
