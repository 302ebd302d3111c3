"""The conv layouts: lean and full both round-trip the shapes they accept, configs from before the choice
rebuild the full layout, and the CLI picks lean for 28x28 / 32x32 images."""

import pytest
import torch

from training.cli.train import parse_args
from training.pipeline import architecture
from training.model import VAE, VAEConfig, num_parameters


@pytest.mark.parametrize("channels, side", [(1, 28), (3, 32), (1, 16), (1, 8)])
@pytest.mark.parametrize("arch", ["full", "lean"])
def test_both_layouts_round_trip_the_image_shape(arch, channels, side):
    vae = VAE(VAEConfig(channels=channels, height=side, width=side, arch=arch))
    x = torch.rand(3, channels, side, side)
    rec, kl, mu = vae(x)
    assert rec.shape == (3,) and kl.shape == (3, 16) and mu.shape == (3, 16)
    assert vae.decode(mu).shape == x.shape


def test_the_lean_layout_has_no_full_resolution_layer():
    """Its first convolution halves the image and its last transposed convolution writes the parameters."""
    lean = VAE(VAEConfig(arch="lean"))
    activations = []
    hooks = [m.register_forward_hook(lambda m, i, o: activations.append(o.shape)) for m in lean.modules()
             if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
    lean(torch.rand(2, 1, 28, 28))
    for hook in hooks:
        hook.remove()
    full_res = [shape for shape in activations if shape[-1] == 28]
    assert full_res == [(2, 2, 28, 28)]  # only the output: loc and log-scale
    assert num_parameters(lean) < num_parameters(VAE(VAEConfig(arch="full"))) / 2


def test_configs_from_before_the_layout_choice_rebuild_the_full_layout():
    old = {"channels": 1, "height": 28, "width": 28, "latent_dim": 16, "base_width": 32, "hidden": 256,
           "likelihood": "logistic", "levels": 256}  # a checkpoint's config written before ``arch`` existed
    rebuilt = VAE(VAEConfig(**old))
    assert rebuilt.config.arch == "full" and num_parameters(rebuilt) == 3_559_234  # the published 28x28 model
    state = VAE(VAEConfig(**old, arch="full")).state_dict()
    rebuilt.load_state_dict(state)  # same parameter names and shapes


def test_layout_choice():
    assert (architecture("auto", 28, 28), architecture("auto", 32, 32), architecture("auto", 8, 8)) == \
           ("lean", "lean", "full")
    assert architecture("full", 28, 28) == "full" and architecture("lean", 8, 8) == "lean"
    assert parse_args([]).arch == "auto"
    with pytest.raises(ValueError, match="lean layout needs a stride-2 step"):
        VAEConfig(height=7, width=7, arch="lean")
    with pytest.raises(ValueError, match="arch must be one of"):
        VAEConfig(arch="wide")


@pytest.mark.slow
def test_compiled_training_saves_plain_checkpoints(digits_dataset, tmp_path):
    """--compile wraps only the training path: the checkpoint's keys carry no ``_orig_mod.`` prefix and load
    into a plain model."""
    from training import trainer
    from training.data import Split
    from training.distributed import DistContext

    torch.manual_seed(0)
    vae = VAE(VAEConfig(height=8, width=8, levels=17, latent_dim=4, base_width=8, hidden=32))
    train = Split(digits_dataset.train.images[:128], digits_dataset.train.labels[:128])
    ctx = DistContext(rank=0, world_size=1, device=torch.device("cpu"))
    config = trainer.TrainConfig(epochs=1, batch_size=32, compile=True)
    result = trainer.train(vae, train, digits_dataset.val, 17, config, ctx, checkpoint_path=tmp_path / "c.ckpt")
    assert result.epochs_run == 1 and result.images_per_s > 0
    state = trainer.load_checkpoint(tmp_path / "c.ckpt")["model"]
    assert not any(key.startswith("_orig_mod.") for key in state)
    VAE(vae.config).load_state_dict(state)


def test_a_mixture_likelihood_writes_three_parameters_per_component_and_decodes_its_weighted_mean(tmp_path):
    from training import export

    vae = VAE(VAEConfig(arch="lean", latent_dim=4, base_width=8, hidden=32, mixture=3)).eval()
    z = torch.randn(2, 4)
    params = vae.decode_params(z)
    assert params.shape == (2, 9, 28, 28)  # weight logits, locations, log-scales of 3 logistics
    weights, loc, _ = params.view(2, 3, 3, 1, 28, 28).unbind(1)
    expected = (torch.softmax(weights, dim=1) * torch.sigmoid(loc)).sum(dim=1)
    assert torch.allclose(vae.decode(z), expected) and vae.decode(z).shape == (2, 1, 28, 28)
    rec, _, _ = vae(torch.rand(2, 1, 28, 28))
    assert rec.shape == (2,) and torch.isfinite(rec).all()
    # The artifact scripts the same code: export compares every method with the eager model.
    x = torch.randint(0, 256, (2, 1, 28, 28)).float() / 255
    serving = export.ServingModule(vae)
    written = export.export_artifact(serving, tmp_path / "vae.ts", export.build_metadata(serving), x)
    assert written["model"]["config"]["mixture"] == 3


def test_mixture_options_are_checked():
    assert VAEConfig().mixture == 1 and parse_args([]).mixture == 1
    with pytest.raises(ValueError, match="mixture must be >= 1, and 1 with the bernoulli likelihood"):
        VAEConfig(likelihood="bernoulli", levels=2, mixture=2)
    with pytest.raises(ValueError, match="mixture must be >= 1"):
        VAEConfig(mixture=0)
    with pytest.raises(SystemExit):
        parse_args(["--binarize", "--mixture", "3"])
