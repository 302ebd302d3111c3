"""A VampPrior artifact, trained through the real CLI, served: /sample draws from the mixture through the
artifact's own sampler, deterministically by seed; every other endpoint works as with N(0, I)."""

import io
import json

import numpy as np
import pytest
import torch

from tests.helpers import SERVED_DEVICE, serving, train_artifact
from service.core import latent
from service.core.runtime import ModelRuntime
from vae_artifact.errors import ArtifactError
from vae_artifact.io import load_artifact, save_artifact

NPY = "application/x-npy"
PSEUDO_INPUTS = 12
VAMP_ARGS = ["--data", "digits", "--device", "cpu", "--epochs", "1", "--prior", "vamp",
             "--pseudo-inputs", str(PSEUDO_INPUTS), "--latent-dim", "8", "--batch-size", "128", "--eval-k", "8",
             "--eval-n", "64", "--score-k", "16", "--seed", "0", "--no-report", "--quiet"]


@pytest.fixture(scope="module")
def vamp_artifact(tmp_path_factory):
    return train_artifact(tmp_path_factory, "vamp", VAMP_ARGS)


@pytest.fixture(scope="module")
def vamp_client(settings, vamp_artifact):
    # The warm-up's bit-identity probe passed on this machine, the prior kernel included
    with serving(settings, vamp_artifact) as client:
        yield client


def npy_of(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.load(io.BytesIO(response.content), allow_pickle=False)


def test_the_model_document_states_the_prior(vamp_client):
    model = vamp_client.get("/v1/model").json()
    text = json.dumps(model)
    assert '"vamp"' in text and f'"components": {PSEUDO_INPUTS}' in text


def test_sample_is_deterministic_by_seed(vamp_client):
    a = vamp_client.post("/sample", json={"n": 6, "seed": 11})
    b = vamp_client.post("/sample", json={"n": 6, "seed": 11})
    c = vamp_client.post("/sample", json={"n": 6, "seed": 12})
    assert a.status_code == 200 and a.content == b.content
    assert a.json()["z"] != c.json()["z"] and a.json()["seed"] == 11
    unseeded = vamp_client.post("/sample", json={"n": 3}).json()
    assert vamp_client.post("/sample", json={"n": 3, "seed": unseeded["seed"]}).json() == unseeded


def test_sample_is_the_artifacts_mixture_sampler_on_the_seeds_noise(vamp_client, vamp_artifact):
    """z = mu_k + T sigma_k eps with eps and k drawn from the seed (bit for bit on CPU); the images decode
    exactly that z."""
    module, meta = load_artifact(vamp_artifact, map_location=SERVED_DEVICE)
    d = meta.latent_dim
    body = vamp_client.post("/sample", json={"n": 20, "seed": 3, "temperature": 0.5}).json()
    # The seed's draws, as the service documents them: numpy's generator, eps first, then the components.
    rng = np.random.default_rng(3)
    rows = np.concatenate([0.5 * rng.standard_normal((20, d)), rng.integers(0, PSEUDO_INPUTS, size=(20, 1))],
                          axis=1).astype(np.float32)
    with torch.no_grad():
        eps, component = (torch.from_numpy(rows[:, :d]).to(SERVED_DEVICE),
                          torch.from_numpy(rows[:, d]).long().to(SERVED_DEVICE))
        expected = module.sample_prior(eps, component).cpu()
        mu_k, std_k = module.prior.mu.cpu(), module.prior.std.cpu()
    served = np.asarray(body["z"], dtype=np.float32)
    if SERVED_DEVICE == "cpu":
        np.testing.assert_array_equal(served, expected.numpy())
    else:  # served by a warmed-up module (TorchScript may fuse its kernels): equal to rounding, 2.4e-7 on an H200
        np.testing.assert_allclose(served, expected.numpy(), rtol=1e-6, atol=1e-6)
    component = rows[:, d].astype(int)
    np.testing.assert_allclose(expected.numpy(), (mu_k[component] + std_k[component] * torch.from_numpy(rows[:, :d]))
                               .numpy(), rtol=1e-6, atol=1e-6)
    pixels = npy_of(vamp_client.post("/sample", json={"n": 20, "seed": 3, "temperature": 0.5}, headers={"accept": NPY}))
    decoded = npy_of(vamp_client.post("/decode", json={"z": body["z"]}, headers={"accept": NPY}))
    np.testing.assert_array_equal(pixels, decoded)


def test_sample_rows_do_not_depend_on_how_many_are_drawn(vamp_client, vamp_artifact):
    """The mixture kernel's rows are bit-identical at every call size (a gather and a multiply-add)."""
    d = load_artifact(vamp_artifact)[1].latent_dim
    rows = latent.mixture_noise(64, d, PSEUDO_INPUTS, 9)
    runtime = ModelRuntime(vamp_artifact, device="cpu")
    full = runtime.sample_prior(rows)["z"]
    for n in (1, 5, 17, 63):
        np.testing.assert_array_equal(runtime.sample_prior(rows[:n])["z"], full[:n])


def test_the_other_endpoints_work_with_the_vamp_prior(vamp_client, digit_images, noise_images):
    images = np.concatenate([digit_images[:8], noise_images[:8]])
    payload = io.BytesIO()
    np.save(payload, images, allow_pickle=False)
    scored = vamp_client.post("/anomaly-score?score=nll", content=payload.getvalue(), headers={"content-type": NPY})
    assert scored.status_code == 200, scored.text
    rows = scored.json()["scores"]
    scores = [row["score_nats"] for row in rows]
    assert all(0 < row["p_value"] <= 1 for row in rows)  # calibrated at the served K
    assert all(np.isfinite(scores)) and np.median(scores[8:]) > np.median(scores[:8])  # noise is less likely
    default = vamp_client.post("/anomaly-score", content=payload.getvalue(), headers={"content-type": NPY})
    assert default.status_code == 200 and all(np.isfinite(row["score_nats"]) for row in default.json()["scores"])
    encoded = vamp_client.post("/encode", content=payload.getvalue(), headers={"content-type": NPY})
    assert encoded.status_code == 200 and len(encoded.json()["mu"]) == 16
    z = encoded.json()["mu"][:2]
    assert vamp_client.post("/decode", json={"z": z}).status_code == 200
    assert vamp_client.post("/interpolate?steps=4", json={"z": z}).status_code == 200


def test_a_mixture_artifact_without_the_sampler_is_refused(tmp_path):
    """An artifact that says vamp but exports no sample_prior (here: an old N(0, I) module relabelled)."""
    module, meta = load_artifact("tests/fixtures/vae_format1.ts")
    document = meta.to_dict()
    document["model"]["prior"] = {"name": "vamp", "components": 3}
    path = tmp_path / "relabelled.ts"
    save_artifact(module, path, document)
    with pytest.raises(ArtifactError, match="sample_prior"):
        ModelRuntime(path, device="cpu")
