"""Score kinds and the OOD evaluation: the contract's compressors count what the standard libraries count, the
calibration in the artifact is what the artifact's own ``score`` reproduces, and the metrics and CLI report what
they claim."""

import bz2
import io
import json
import math
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training import calibration, ood
from training.cli.ood import main as ood_cli
from training.data import load_dataset, to_8bit
from training.model import VAE, VAEConfig
from vae_artifact import complexity
from vae_artifact.calibration import Calibration
from vae_artifact.io import load_artifact
from tests.helpers import REPO, datasets



def real_images() -> dict:
    """8-bit images as a client sends them: sklearn digits always, MNIST / Fashion-MNIST when present."""
    digits = load_dataset("digits", seed=0)
    sets = {"digits": to_8bit(digits.test.images[:100], digits.levels)}
    for name in ("mnist", "fashion-mnist"):
        if datasets() is not None and (datasets() / name).is_dir():
            sets[name] = load_dataset(f"idx:{datasets() / name}", seed=0).test.images[:300]
    rng = np.random.default_rng(0)
    sets["rgb-noise"] = rng.integers(0, 256, size=(20, 3, 16, 12), dtype=np.uint8)
    return sets


def independent_bytes(image: np.ndarray, compressor: str) -> int:
    """The recorded recipe, written out with the standard libraries: raw C-order bytes, or a Pillow PNG."""
    raw = np.ascontiguousarray(image).tobytes()
    if compressor == "zlib":
        return len(zlib.compress(raw, 9))
    if compressor == "bz2":
        return len(bz2.compress(raw, 9))
    buf = io.BytesIO()
    array = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
    Image.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG", compress_level=9, optimize=False)
    return len(buf.getvalue())


@pytest.mark.parametrize("compressor", complexity.COMPRESSORS)
def test_compressed_bits_are_the_recorded_recipe_on_real_images(compressor):
    for name, images in real_images().items():
        for levels in (256, 17, 2):
            ours = complexity.compressed_bits(images, compressor, levels)
            snapped = complexity.snap(images, levels)
            theirs = [8 * independent_bytes(image, compressor) for image in snapped]
            np.testing.assert_array_equal(ours, theirs, err_msg=f"{compressor} on {name} at {levels} levels")
            assert (ours > 0).all() and (ours % 8 == 0).all()
        assert complexity.supports(complexity.describe(compressor))
    assert not complexity.supports(dict(complexity.describe(compressor), params={"level": 1}))


def test_snap_is_what_the_model_scores():
    u8 = np.arange(256, dtype=np.uint8).reshape(1, 1, 16, 16)
    for likelihood, levels in (("logistic", 256), ("logistic", 17), ("bernoulli", 2)):
        vae = VAE(VAEConfig(height=16, width=16, likelihood=likelihood, levels=levels))
        expected = vae.quantize(torch.from_numpy(u8).float() / 255).mul(255).round().numpy()
        np.testing.assert_array_equal(complexity.snap(u8, levels), expected)


def test_simple_images_compress_smaller():
    blank, noise = np.zeros((1, 1, 28, 28), np.uint8), np.random.default_rng(0).integers(0, 256, (1, 1, 28, 28))
    for compressor in complexity.COMPRESSORS:
        bits = complexity.compressed_bits(np.concatenate([blank, noise.astype(np.uint8)]), compressor)
        assert bits[0] < 0.25 * bits[1], (compressor, bits)


def test_kind_scores_subtract_the_code_length_in_nats():
    images = real_images()["digits"][:10]
    nll = np.linspace(50.0, 60.0, 10)
    scores, bits = calibration.kind_scores(nll, images, levels=17)
    np.testing.assert_array_equal(scores["nll"], nll)
    for c in complexity.COMPRESSORS:
        np.testing.assert_allclose(scores[f"nll-minus-{c}"], nll - math.log(2) * bits[c])
    assert calibration.DEFAULT_KIND in calibration.KINDS


def test_detection_metrics_on_known_sets():
    perfect = ood.detection_metrics(np.arange(100.0), np.arange(100.0, 200.0))
    assert perfect == {"auroc": 1.0, "auprc": 1.0, "fpr_at_95_tpr": 0.0}
    reversed_ = ood.detection_metrics(np.arange(100.0, 200.0), np.arange(100.0))
    assert reversed_["auroc"] == 0.0 and reversed_["fpr_at_95_tpr"] == 1.0
    rng = np.random.default_rng(0)  # OOD shifted by one sd: AUROC = Phi(1 / sqrt(2)) ~ 0.760
    shifted = ood.detection_metrics(rng.normal(size=20000), rng.normal(1.0, size=20000))
    assert shifted["auroc"] == pytest.approx(0.760, abs=0.01)
    # FPR at 95% TPR: the normal mass above the OOD 5% quantile, 1 - Phi(1 - 1.645) ~ 0.741
    assert shifted["fpr_at_95_tpr"] == pytest.approx(0.741, abs=0.015)


def test_p_values_match_the_formula():
    cal = np.array([1.0, 2.0, 2.0, 3.0, 5.0])
    s = np.array([0.0, 2.0, 2.5, 6.0])
    upper = Calibration.of(cal).p_values(s)
    np.testing.assert_allclose(upper, [(1 + 5) / 6, (1 + 4) / 6, (1 + 2) / 6, 1 / 6])
    lower = np.array([1 / 6, (1 + 3) / 6, (1 + 3) / 6, 1.0])
    np.testing.assert_allclose(Calibration.of(cal).p_values(s, "two-sided"), np.minimum(1, 2 * np.minimum(upper, lower)))


def test_artifact_holds_every_kind_calibrated_on_the_calib_split(digits_artifact, digits_dataset):
    meta = load_artifact(digits_artifact)[1]
    scoring, calib = meta["scoring"], meta["calibration"]
    assert set(scoring["kinds"]) == set(calibration.KINDS) == set(calib["scores"]) and scoring["default"] == calibration.DEFAULT_KIND
    assert calib["k"] == scoring["k"] and calib["n"] == len(digits_dataset.calib)
    for kind, scores in calib["scores"].items():
        assert len(scores) == calib["n"] and scores == sorted(scores), kind
        spec = scoring["kinds"][kind]["complexity"]
        assert (spec is None) == (kind == "nll") and scoring["kinds"][kind]["units"] == "nats"
        if spec is not None:
            assert spec["params"] == complexity.PARAMS[spec["name"]] and spec["library"]


def test_calibrate_recomputes_the_same_scores_from_the_scripted_artifact(digits_artifact, tmp_path):
    """Calibration at training time (eager model) == recalibration from the saved artifact (TorchScript)."""
    out = tmp_path / "recalibrated.ts"
    assert ood_cli(["calibrate", "--model", str(digits_artifact), "--out", str(out)]) == 0
    before, after = load_artifact(digits_artifact)[1].to_dict(), load_artifact(out)[1].to_dict()
    references = {}
    for meta in (before, after):  # a combined kind's reference values are model scores too: compared below
        for kind, description in meta["scoring"]["kinds"].items():
            if "combination" in description:
                references.setdefault(kind, []).append([t.pop("reference") for t in description["combination"]["terms"]])
    assert after["weights_sha256"] == before["weights_sha256"] and after["scoring"] == before["scoring"]
    assert set(references) == {k for k in calibration.KINDS if calibration.is_combined(k)}
    for kind, (old, new) in references.items():
        for a, b in zip(old, new):
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-3, err_msg=kind)
    for kind, scores in before["calibration"]["scores"].items():
        np.testing.assert_allclose(after["calibration"]["scores"][kind], scores, rtol=1e-5, atol=1e-3)


def test_evaluate_command_reports_every_kind_and_baseline(digits_artifact, tmp_path, capsys):
    out = tmp_path / "ood.json"
    assert ood_cli(["evaluate", "--model", str(digits_artifact), "--normal", "digits", "--holdout-class", "3",
                     "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["kinds"]) == set(calibration.KINDS) and set(result["baselines"]) == {"size-png", "size-zlib", "size-bz2"}
    assert result["n_ood"] == int((load_dataset("digits").test.labels == 3).sum())
    for row in result["kinds"].values():
        assert 0 <= row["auroc"] <= 1 and 0 <= row["fpr_at_95_tpr"] <= 1 and 0 <= row["fpr_at_alpha_0.05"] <= 1
    printed = capsys.readouterr().out
    assert "AUROC" in printed and f"{calibration.DEFAULT_KIND} (default)" in printed


def test_the_anomaly_guide_states_the_real_calibration_size_of_the_default_data():
    """What the smallest p-value of the bundled digits is follows from their calib split's real size."""
    guide = (REPO / "docs" / "anomaly.md").read_text()
    n = len(load_dataset("digits", seed=0).calib)
    assert f"give n = {n}" in guide
    assert "1 / (n + 1)" in guide


def write_idx(directory: Path, prefix: str, images: np.ndarray, labels: np.ndarray) -> None:
    """The IDX format MNIST ships in: 2 zero bytes, dtype 0x08, the number of dims, big-endian dims, the bytes."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, array in ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)):
        header = bytes([0, 0, 8, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
        (directory / name).write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def test_both_protocols_in_one_table(digits_artifact, tmp_path, capsys):
    """``python -m training ood protocols`` with a model given for each protocol (no training): IDX sources
    shaped like MNIST and Fashion-MNIST (here 8x8 digits), every kind, baseline and candidate per protocol, each
    group's mean and worst, and the checks on the default."""
    digits = load_dataset("digits", seed=0)
    images = to_8bit(np.concatenate([digits.train.images, digits.val.images, digits.test.images]), digits.levels)
    labels = np.concatenate([digits.train.labels, digits.val.labels, digits.test.labels])
    for name, lo in (("mnist", 0), ("fashion-mnist", 5)):  # "fashion" = digits 5-9, "mnist" = all digits
        keep = labels >= lo
        write_idx(tmp_path / "data" / name, "train", images[keep][:600, 0], labels[keep][:600])
        write_idx(tmp_path / "data" / name, "t10k", images[keep][600:, 0], labels[keep][600:])
    argv = ["protocols", "--data-dir", str(tmp_path / "data"), "--holdout-classes", "1,3", "--sets", "mnist",
            "--work", str(tmp_path / "w"), "--limit", "150", "--candidates"] + [
        f"--model={p}={digits_artifact}" for p in ("fashion", "mnist-no1", "mnist-no3")]
    assert ood_cli(argv) == 0
    summary = json.loads((tmp_path / "w" / "ood.json").read_text())
    assert list(summary["protocols"]) == ["fashion", "mnist-no1", "mnist-no3"]
    for result in summary["protocols"].values():
        assert set(result["kinds"]) == set(calibration.KINDS) and result["default"] == calibration.DEFAULT_KIND
        assert set(result["baselines"]) == {f"size-{c}" for c in complexity.COMPRESSORS}
        assert {"knn-5", "mahalanobis", "rapp-sap", "rapp-nap", "density-means"} <= set(result["candidates"])
        assert set(result["variants"]) == {"density-bz2, guards whole", "density-bz2, no guards"}
        assert 0 < result["n_normal"] <= 150 and 0 < result["n_ood"] <= 150
        assert all(0 <= m["fpr_at_alpha_0.05"] <= 1 for m in result["kinds"].values())
    assert [r["group"] for r in summary["protocols"].values()] == ["fashion-to-mnist", "mnist", "mnist"]
    no1, no3 = (summary["protocols"][p]["kinds"][calibration.DEFAULT_KIND]["auroc"] for p in ("mnist-no1", "mnist-no3"))
    group = summary["groups"]["mnist"]
    assert group["mean"][calibration.DEFAULT_KIND]["auroc"] == pytest.approx((no1 + no3) / 2)
    assert group["min_auroc"][calibration.DEFAULT_KIND] == min(no1, no3)
    assert set(summary["checks"]) == {"below_plain", "fpr_outside_band"}
    printed = capsys.readouterr().out
    assert f"{calibration.DEFAULT_KIND} (default)" in printed and "MNIST, one class held out" in printed
    assert "size-bz2 (no model)" in printed and "knn-5 (candidate)" in printed and "below_plain" in printed
