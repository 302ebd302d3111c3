"""The artifact contract: scripted == eager, the metadata schema, calibration scores the service can
reproduce, and refusal of damaged or foreign files."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from training import export
from training.data import Split, to_8bit
from training.export import ArtifactError, ServingModule, export_artifact
from training.model import VAE, VAEConfig
from vae_artifact import io as artifact_io
from vae_artifact.io import load_artifact


def small_vae(likelihood: str) -> VAE:
    torch.manual_seed(0)
    return VAE(VAEConfig(channels=1, height=8, width=8, latent_dim=4, base_width=8, hidden=32,
                         likelihood=likelihood, levels=2 if likelihood == "bernoulli" else 17))


def grid_images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 17, (n, 1, 8, 8), generator=torch.Generator().manual_seed(seed)).float() / 16


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    vae = small_vae("logistic")
    path = tmp_path_factory.mktemp("export") / "vae.ts"
    serving = ServingModule(vae)
    meta = export_artifact(serving, path, export.build_metadata(serving, data={"name": "unit"}), check_x=grid_images(4))
    return path, vae, meta


def resave(src: Path, dst: Path, edit_meta=None, edit_module=None) -> Path:
    """Copy an artifact through torch.jit, optionally changing its metadata or its weights."""
    module, meta = load_artifact(src)
    meta = meta.to_dict()
    if edit_meta:
        edit_meta(meta)
    if edit_module:
        edit_module(module)
    with artifact_io.quiet_torchscript():
        torch.jit.save(module, str(dst), _extra_files={"metadata.json": json.dumps(meta)})
    return dst


@pytest.mark.parametrize("likelihood", ["logistic", "bernoulli"])
def test_scripted_matches_eager(tmp_path, likelihood):
    vae = small_vae(likelihood)
    path = tmp_path / "vae.ts"
    eager = ServingModule(vae)
    export_artifact(eager, path, export.build_metadata(eager), check_x=grid_images(4))
    module, _ = load_artifact(path)
    x, eps = grid_images(6, seed=1), torch.randn(5, 6, 4, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        for a, b in zip(eager.encode(x), module.encode(x)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(eager.decode(eps[0]), module.decode(eps[0]), atol=1e-5, rtol=1e-5)
        for a, b in zip(eager.score(x, eps), module.score(x, eps)):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)
        out = module.decode(eps[0])
    assert out.shape == (6, 1, 8, 8) and out.min() >= 0 and out.max() <= 1


def test_a_row_scores_the_same_in_any_batch(artifact):
    module, _ = load_artifact(artifact[0])
    x, eps = grid_images(6), torch.randn(8, 6, 4, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        together = module.score(x, eps)[0]
        alone = torch.cat([module.score(x[i : i + 1], eps[:, i : i + 1])[0] for i in range(6)])
    torch.testing.assert_close(together, alone, atol=1e-4, rtol=1e-5)


def test_metadata_schema(artifact):
    path, vae, written = artifact
    _, meta = load_artifact(path)
    assert meta == written
    assert meta["format_version"] == export.FORMAT_VERSION and isinstance(meta["format_version"], int)
    assert meta["model"]["image"] == {"channels": 1, "height": 8, "width": 8}
    assert meta["model"]["latent_dim"] == 4 and meta["model"]["likelihood"] == "logistic"
    assert meta["pixels"]["levels"] == 17 and meta["pixels"]["num_dims"] == 64
    assert set(meta["methods"]) == {"encode", "decode", "score"}
    assert isinstance(meta["created"], str) and isinstance(meta["torch_version"], str)
    assert meta["data"] == {"name": "unit"}
    assert meta["weights_sha256"] == artifact_io.weights_sha256(ServingModule(vae))
    assert len(meta["weights_sha256"]) == 64


def test_trained_artifact_metadata(digits_artifact, digits_dataset):
    meta = load_artifact(digits_artifact)[1]
    assert meta["data"]["name"] == "digits" and meta["data"]["levels"] == 17
    assert meta["data"]["n_calib"] == len(digits_dataset.calib) and meta["data"]["n_test"] == len(digits_dataset.test)
    assert meta["data"]["image"] == {"channels": 1, "height": 8, "width": 8}
    for key in ("epochs_run", "best_epoch", "seed", "beta", "lr", "batch_size", "wall_time_s", "device",
                "world_size", "final"):
        assert key in meta["training"], key
    for key in ("test_elbo_nats", "test_elbo_se", "iw_nll_nats", "iw_nll_se", "iw_k", "elbo_bits_per_dim",
                "iw_nll_bits_per_dim", "active_units", "latent_dim", "n_test"):
        assert math.isfinite(meta["evaluation"][key]), key
    assert meta["scoring"]["k"] == 32 and meta["scoring"]["noise_seed"] == 0
    calib = meta["calibration"]
    assert calib["split"] == "calib" and calib["k"] == 32 and calib["n"] == len(digits_dataset.calib)
    assert calib["scores"]["nll"] == sorted(calib["scores"]["nll"]) and len(calib["scores"]["nll"]) == calib["n"]


def test_calibration_scores_are_reproducible_from_the_artifact(digits_artifact, digits_dataset):
    """The service's recipe, written out from the metadata alone, gives the recorded calibration scores."""
    module, meta = load_artifact(digits_artifact)
    k, seed, d = meta["scoring"]["k"], meta["scoring"]["noise_seed"], meta["model"]["latent_dim"]
    # What a service does with an 8-bit image: value / 255; the module snaps it onto its 17 levels.
    pixels8 = torch.from_numpy(digits_dataset.calib.images).double().mul(255 / 16).round()
    x = (pixels8 / 255).float()
    eps = torch.randn((k, d), generator=torch.Generator("cpu").manual_seed(seed))
    with torch.inference_mode():
        iw = torch.cat([module.score(xb, eps.unsqueeze(1).expand(k, xb.shape[0], d))[0] for xb in x.split(50)])
    expected = torch.tensor(meta["calibration"]["scores"]["nll"], dtype=torch.float64)
    torch.testing.assert_close(torch.sort(-iw.double()).values, expected, atol=1e-3, rtol=1e-5)


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(ArtifactError, match="no such artifact"):
        load_artifact(tmp_path / "absent.ts")


def test_truncated_file_is_refused(artifact, tmp_path):
    data = artifact[0].read_bytes()
    bad = tmp_path / "truncated.ts"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="not a readable TorchScript artifact"):
        load_artifact(bad)


def test_random_bytes_are_refused(tmp_path):
    bad = tmp_path / "random.ts"
    bad.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(ArtifactError, match="not a readable TorchScript artifact"):
        load_artifact(bad)


def test_newer_format_version_is_refused(artifact, tmp_path):
    def bump(meta):
        meta["format_version"] = export.FORMAT_VERSION + 1

    newer = resave(artifact[0], tmp_path / "newer.ts", edit_meta=bump)
    with pytest.raises(ArtifactError, match="newer than this code understands"):
        load_artifact(newer)


def test_tampered_weights_are_refused(artifact, tmp_path):
    def tamper(module):
        with torch.no_grad():
            next(iter(module.parameters())).add_(1e-3)

    tampered = resave(artifact[0], tmp_path / "tampered.ts", edit_module=tamper)
    with pytest.raises(ArtifactError, match="sha256"):
        load_artifact(tampered)


def test_resaving_unchanged_is_accepted(artifact, tmp_path):
    # The control for the two refusals above: the copy itself is not what they detect.
    module, meta = load_artifact(resave(artifact[0], tmp_path / "copy.ts"))
    assert meta["weights_sha256"] == artifact[2]["weights_sha256"]


def test_the_latent_bank_and_its_nearest_neighbour_distance(tmp_path, artifact, digits_dataset):
    """``latent_bank`` holds the posterior means of a seeded sample of training images as served; the artifact's
    ``latent_neighbour_distance`` is the distance to the nearest of them (brute force in float64), the same for
    a row alone or in a batch; an artifact without a bank neither lists nor answers it."""
    torch.manual_seed(0)
    vae = VAE(VAEConfig(channels=1, height=8, width=8, latent_dim=4, base_width=8, hidden=32, levels=17)).eval()
    split = digits_dataset.train
    bank = export.latent_bank(vae, split, digits_dataset.levels, n=40, seed=3)
    picks = np.sort(np.random.default_rng(3).choice(len(split), size=40, replace=False))
    with torch.inference_mode():
        served = ServingModule(vae).encode(torch.from_numpy(to_8bit(split.images[picks], 17)).float() / 255)[0]
    torch.testing.assert_close(bank, served, atol=0, rtol=0)
    assert export.latent_bank(vae, Split(split.images[:7], split.labels[:7]), 17, n=40).shape == (7, 4)

    path = tmp_path / "vae.ts"
    serving = ServingModule(vae, bank)
    meta = export_artifact(serving, path, export.build_metadata(serving), check_x=grid_images(4))
    assert set(meta["methods"]) == {"encode", "decode", "score", "latent_neighbour_distance"}
    module, _ = load_artifact(path)
    x = torch.cat([grid_images(8, seed=4), torch.from_numpy(to_8bit(split.images[picks[:2]], 17)).float() / 255])
    with torch.inference_mode():
        distance = module.latent_neighbour_distance(x)
        mu = module.encode(x)[0].double()
        alone = torch.cat([module.latent_neighbour_distance(x[i:i + 1]) for i in range(len(x))])
    brute = ((mu[:, None, :] - bank.double()[None]) ** 2).sum(dim=-1).sqrt().min(dim=1).values
    torch.testing.assert_close(distance.double(), brute, atol=1e-6, rtol=1e-6)
    # The distance is taken pair by pair, not through a matrix product; the encoder before it may still round
    # a lone row's posterior mean otherwise on some CPUs, which the service's padding takes care of.
    torch.testing.assert_close(alone, distance, atol=1e-6, rtol=1e-6)
    assert distance[-2:].tolist() == [0.0, 0.0] and distance[:8].min() > 0  # bank images sit on their own latent
    plain, plain_meta = load_artifact(artifact[0])
    assert "latent_neighbour_distance" not in plain_meta["methods"]
    with pytest.raises(torch.jit.Error, match="no latent bank"):
        plain.latent_neighbour_distance(x)
