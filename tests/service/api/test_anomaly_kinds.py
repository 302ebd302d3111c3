"""/anomaly-score kinds against the session's digits artifact: the served score equals an independent float64
recomputation, calibration scores are reproduced exactly by the service, results do not depend on the batch,
and old or foreign artifacts degrade to what the service can honestly compute."""

import bz2
import io
import math
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from service.core.scoring import Calibration, ScoreKinds, UnknownScoreKind
from training.model import VAE, VAEConfig
from vae_artifact import complexity
from vae_artifact.io import load_artifact
from vae_artifact.metadata import Metadata

NPY = "application/x-npy"
KINDS = ("nll", "nll-minus-png", "nll-minus-zlib", "nll-minus-bz2", "fisher-bz2", "fisher-bz2-nn", "density-bz2")
COMPRESSOR = {kind: next((c for c in complexity.COMPRESSORS if c in kind), None) for kind in KINDS}


def npy(array) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def post(client, images, query=""):
    response = client.post(f"/anomaly-score?{query}", content=npy(images), headers={"content-type": NPY})
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture(scope="module")
def calib_images(digits_dataset) -> np.ndarray:
    return np.round(digits_dataset.calib.images.astype(np.float64) * 255 / 16).astype(np.uint8)


@torch.inference_mode()
def slow_iw_score(artifact_path, image: np.ndarray, k: int) -> dict:
    """One image, eager ``training.model.VAE`` in float64, one importance sample at a time, the densities and
    the logsumexp written out in numpy: the K-sample bound, ELBO terms, SE and ESS the service should return."""
    module, meta = load_artifact(artifact_path)
    vae = VAE(VAEConfig(**meta["model"]["config"])).double().eval()
    vae.load_state_dict({name[len("vae."):]: t for name, t in module.state_dict().items() if name.startswith("vae.")})
    x = vae.quantize(torch.from_numpy(image[None]).double() / 255.0)
    mu, logvar = (t[0].numpy() for t in vae.encode(x))
    eps = torch.randn((k, len(mu)), generator=torch.Generator("cpu").manual_seed(meta["scoring"]["noise_seed"]))
    log_w, rec = [], []
    for e in eps.double().numpy():
        z = mu + np.exp(0.5 * logvar) * e
        log_px_z = float(vae.log_px_z(x, vae.decode_params(torch.from_numpy(z)[None]))[0])
        log_pz = -0.5 * np.sum(np.log(2 * np.pi) + z**2)
        log_qz = -0.5 * np.sum(np.log(2 * np.pi) + logvar + (z - mu) ** 2 / np.exp(logvar))
        log_w.append(log_px_z + log_pz - log_qz)
        rec.append(log_px_z)
    log_w = np.array(log_w)
    top = log_w.max()
    w = np.exp(log_w - top)
    kl = 0.5 * np.sum(mu**2 + np.exp(logvar) - 1.0 - logvar)
    return {"nll_nats": -(top + np.log(w.mean())), "elbo_nats": np.mean(rec) - kl, "kl_nats": kl,
            "nll_se_nats": w.std(ddof=1) / (np.sqrt(k) * w.mean()), "ess": w.sum() ** 2 / (w**2).sum()}


def test_served_score_equals_an_independent_float64_computation(client, digits_artifact, digit_images, noise_images):
    k = 32
    batch = np.concatenate([noise_images[:3], digit_images[7:8], digit_images[:5]])  # the image sits mid-batch
    rows = post(client, batch, "score=nll")["scores"]
    for row, image in ((rows[3], digit_images[7]), (rows[0], noise_images[0])):
        slow = slow_iw_score(digits_artifact, image, k)
        for key, value in slow.items():
            assert row[key] == pytest.approx(value, rel=1e-4, abs=1e-3), key
        assert row["score_nats"] == row["nll_nats"]


def independent_bits(images: np.ndarray, compressor: str, levels: int) -> np.ndarray:
    """8 x the compressed bytes of each image snapped onto the model's levels, written out with the standard
    libraries (the artifact records these parameters: level 9, raw C-order bytes or a mode-L PNG)."""
    steps = levels - 1
    snapped = np.round(np.round(images * (steps / 255.0)) * (255.0 / steps)).astype(np.uint8)
    sizes = []
    for image in snapped:
        if compressor == "png":
            buffer = io.BytesIO()
            Image.fromarray(image[0]).save(buffer, format="PNG", compress_level=9)
            sizes.append(len(buffer.getvalue()))
        else:
            sizes.append(len({"bz2": bz2.compress, "zlib": zlib.compress}[compressor](image.tobytes(), 9)))
    return 8.0 * np.array(sizes)


@pytest.mark.parametrize("kind", KINDS)
def test_the_service_reproduces_the_calibration_scores(client, calib_images, digits_artifact, kind):
    """Calibration images scored by the service land exactly on their stored scores: same K, noise, compressor."""
    body = post(client, calib_images[:40], f"score={kind}")
    stored = Calibration.from_metadata(load_artifact(digits_artifact)[1], kind).scores
    served = np.array([r["score_nats"] for r in body["scores"]])
    nearest = stored[np.abs(stored[None, :] - served[:, None]).argmin(axis=1)]
    np.testing.assert_allclose(served, nearest, rtol=1e-5, atol=1e-3)
    if kind != "nll":
        bits = independent_bits(calib_images[:40], COMPRESSOR[kind], levels=17)
        np.testing.assert_array_equal([r["complexity_bits"] for r in body["scores"]], bits)
    if kind.startswith("nll-minus-"):
        np.testing.assert_allclose(served, [r["nll_nats"] for r in body["scores"]] - math.log(2) * bits, rtol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_is_the_same_in_any_batch(client, digit_images, noise_images, kind):
    image = digit_images[11:12]
    alone = post(client, image, f"score={kind}")["scores"][0]
    small = post(client, np.concatenate([noise_images[:2], image]), f"score={kind}")["scores"][2]
    large = post(client, np.concatenate([digit_images[:30], image, noise_images]), f"score={kind}")["scores"][30]
    assert alone == small == large


def test_default_kind_and_the_kinds_on_offer(client, digits_artifact):
    meta = load_artifact(digits_artifact)[1]
    body = post(client, np.zeros((1, 1, 8, 8), np.uint8))
    assert body["score"] == meta["scoring"]["default"] != "nll"
    assert body["scores"][0]["complexity_bits"] > 0
    assert set(client.get("/v1/model").json()["metadata"]["scoring"]["kinds"]) == set(KINDS)
    response = client.post("/anomaly-score?score=likelihood-ratio", content=npy(np.zeros((1, 1, 8, 8), np.uint8)),
                           headers={"content-type": NPY})
    assert response.status_code == 422 and response.json()["error"]["code"] == "unknown_score"
    assert all(kind in response.json()["error"]["message"] for kind in KINDS)


def test_two_sided_flags_atypically_likely_inputs(client, calib_images):
    body = post(client, calib_images[:60], "score=nll&tail=two-sided&alpha=0.2")
    cal = body["calibration"]
    assert cal["threshold_low_nats"] < cal["threshold_nats"]
    for row in body["scores"]:
        outside = row["score_nats"] > cal["threshold_nats"] or row["score_nats"] < cal["threshold_low_nats"]
        assert row["is_anomaly"] == outside == (row["p_value"] <= 0.2)
    assert any(r["is_anomaly"] and r["score_nats"] < cal["threshold_low_nats"] for r in body["scores"])


@pytest.mark.parametrize("n, alpha", [(99, 0.02), (144, 0.1), (1000, 0.05), (20, 0.3)])
def test_two_sided_thresholds_flag_exactly_the_small_p_values(n, alpha):
    rng = np.random.default_rng(n)
    cal = Calibration(np.sort(np.round(rng.normal(size=n), 2)), k=1)
    hi, lo = cal.threshold(alpha / 2), cal.lower_threshold(alpha / 2)
    probes = np.concatenate([cal.scores, cal.scores + 1e-9, cal.scores - 1e-9, [-50, 50]])
    np.testing.assert_array_equal(cal.p_values(probes, "two-sided") <= alpha, (probes > hi) | (probes < lo))


def test_old_and_foreign_artifacts_offer_only_what_can_be_computed():
    old = ScoreKinds.from_metadata(artifact_metadata(calibration={"k": 8, "scores": {"nll": [1.0, 2.0]}},
                                                     scoring={"k": 8}))
    assert list(old.kinds) == ["nll"] and old.get(None).name == "nll" and old.get(None).calibration.n == 2
    with pytest.raises(UnknownScoreKind, match=r"\['nll'\]"):
        old.get("nll-minus-png")
    foreign = {"name": "zlib", "params": {"level": 6}}  # other parameters: its calibration would not match
    meta = artifact_metadata(scoring={"default": "nll-minus-zlib", "kinds": {"nll": {"complexity": None},
                                                                             "nll-minus-zlib": {"complexity": foreign}}},
                             calibration={"k": 4, "scores": {"nll": [1.0], "nll-minus-zlib": [0.5]}},
                             pixels={"levels": 17})
    kinds = ScoreKinds.from_metadata(meta)
    assert list(kinds.kinds) == ["nll"] and kinds.default == "nll" and kinds.levels == 17


def artifact_metadata(**sections) -> Metadata:
    """A format-1 document with only the model's shape besides ``sections`` (as old or foreign artifacts have)."""
    model = {"image": {"channels": 1, "height": 8, "width": 8}, "latent_dim": 4}
    return Metadata.from_dict({"format_version": 1, "model": model, **sections})
