"""An artifact whose p(x|z) is a mixture of discretised logistics (``--mixture``), trained through the real CLI,
served: /decode and /sample return the mixture's mean as the artifact computes it, anomaly scores are the
mixture's likelihood, and a row scores the same bits alone or in a batch."""

import io
import json

import numpy as np
import pytest
import torch

from service.core.codecs import encode_npy
from tests.helpers import serving, train_artifact
from training.model import VAE, VAEConfig
from training.trainer import load_checkpoint

NPY = "application/x-npy"
COMPONENTS = 3
MIXTURE_ARGS = ["--data", "digits", "--device", "cpu", "--epochs", "2", "--mixture", str(COMPONENTS),
                "--latent-dim", "8", "--batch-size", "128", "--eval-k", "8", "--eval-n", "64", "--score-k", "16",
                "--seed", "0", "--no-report", "--quiet"]


@pytest.fixture(scope="module")
def mixture_artifact(tmp_path_factory):
    return train_artifact(tmp_path_factory, "mixture", MIXTURE_ARGS)


@pytest.fixture(scope="module")
def mixture_client(settings, mixture_artifact):
    # The warm-up's bit-identity probe passed for every kernel of this model
    with serving(settings, mixture_artifact) as client:
        yield client


def test_the_model_document_states_the_mixture(mixture_client):
    assert f'"mixture": {COMPONENTS}' in json.dumps(mixture_client.get("/v1/model").json())


def test_decode_serves_the_mixture_mean(mixture_client, mixture_artifact):
    """The mean of each pixel's mixture, sum_m softmax(w)_m * sigmoid(loc_m), written out here from the trained
    weights (the checkpoint beside the artifact, in eager PyTorch), not taken from the artifact."""
    checkpoint = load_checkpoint(mixture_artifact.with_suffix(".ckpt"))
    vae = VAE(VAEConfig(**checkpoint["config"])).eval()
    vae.load_state_dict(checkpoint["model"])
    z = np.random.default_rng(3).standard_normal((5, 8)).astype(np.float32)
    served = mixture_client.post("/decode", json={"z": z.tolist()}, headers={"accept": NPY})
    assert served.status_code == 200, served.text
    pixels = np.load(io.BytesIO(served.content), allow_pickle=False)
    with torch.inference_mode():
        params = vae.decode_params(torch.from_numpy(z)).double()  # (5, 3 M C, 8, 8): weights, locs, log-scales
    weights, loc, _ = params.view(5, 3, COMPONENTS, 1, 8, 8).unbind(1)
    expected = (torch.softmax(weights, dim=1) * torch.sigmoid(loc)).sum(dim=1).numpy()
    assert pixels.shape == (5, 1, 8, 8) and 0.0 <= pixels.min() and pixels.max() <= 1.0
    np.testing.assert_allclose(pixels, expected, rtol=0, atol=1e-5)
    assert mixture_client.post("/sample", json={"n": 4, "seed": 1}).status_code == 200


def test_scores_use_the_mixture_and_do_not_depend_on_the_batch(mixture_client, digit_images, noise_images):
    images = np.concatenate([digit_images[:8], noise_images[:8]])
    batch = mixture_client.post("/anomaly-score?score=nll", content=encode_npy(images), headers={"content-type": NPY})
    assert batch.status_code == 200, batch.text
    rows = batch.json()["scores"]
    scores = [row["score_nats"] for row in rows]
    assert all(np.isfinite(scores)) and all(0 < row["p_value"] <= 1 for row in rows)
    assert np.median(scores[8:]) > np.median(scores[:8])  # noise is less likely than digits
    for i in (0, 9):
        alone = mixture_client.post("/anomaly-score?score=nll", content=encode_npy(images[i:i + 1]),
                                    headers={"content-type": NPY})
        assert alone.json()["scores"][0]["score_nats"] == scores[i]
