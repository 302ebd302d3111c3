"""Recalibration rebuilds exactly the calib split a model was trained beside (never training images), from the
data recipe the artifact records, or refuses; and it calibrates on what the service scores. The OOD evaluation
gives a model its test images in the shape training gave it its data."""

from pathlib import Path

import numpy as np
import pytest
import torch

from training.cli import main as train
from training import ood
from training.calibration import recalibrate
from training.recipe import recorded_dataset
from training.data import load_dataset
from vae_artifact.io import load_artifact, save_artifact
from tests.helpers import FORMAT1

TINY = ["--data", "digits", "--device", "cpu", "--epochs", "2", "--eval-k", "8", "--score-k", "8", "--latent-dim", "4",
        "--base-width", "8", "--no-report", "--quiet"]


def trained(tmp_path: Path, *options: str) -> Path:
    out = tmp_path / "vae.ts"
    assert train([*TINY, *options, "--out", str(out)]) == 0
    return out


def image_bytes(images: np.ndarray) -> set:
    return {image.tobytes() for image in images}


@pytest.mark.parametrize("options, load_options", [
    (["--val-fraction", "0.05"], {"val_fraction": 0.05}),
    (["--val-fraction", "0.05", "--image-size", "12"], {"val_fraction": 0.05, "image_size": 12}),
])
def test_recalibration_rebuilds_the_calib_split_the_model_was_trained_beside(tmp_path, options, load_options):
    """Non-default splits: the default --val-fraction would put 72 of the 144 digits calib images in training."""
    model = trained(tmp_path, *options)
    meta = load_artifact(model)[1]
    assert {key: meta["data"][key] for key in load_options} == load_options
    same = load_dataset("digits", seed=0, **load_options)  # the split training used
    rebuilt = recorded_dataset(meta["data"])
    assert image_bytes(rebuilt.calib.images) == image_bytes(same.calib.images)
    assert not image_bytes(rebuilt.calib.images) & image_bytes(same.train.images)

    out = tmp_path / "recalibrated.ts"
    calibration = recalibrate(model, out=out)
    assert calibration["n"] == len(same.calib) == 144
    for kind, scores in meta["calibration"]["scores"].items():
        np.testing.assert_allclose(calibration["scores"][kind], scores, rtol=1e-5, atol=1e-3, err_msg=kind)


def test_an_artifact_without_the_data_recipe_is_refused(tmp_path):
    with pytest.raises(SystemExit, match=r"val_fraction.*--assume-training-defaults"):
        recalibrate(FORMAT1, out=tmp_path / "out.ts")
    assert not (tmp_path / "out.ts").exists()
    # It was trained with the defaults, which its recorded split sizes confirm: stated, it is recalibrated.
    calibration = recalibrate(FORMAT1, out=tmp_path / "out.ts", assume_defaults=True)
    before = load_artifact(FORMAT1)[1]["calibration"]["scores"]
    for kind, scores in before.items():
        np.testing.assert_allclose(calibration["scores"][kind], scores, rtol=1e-5, atol=1e-3, err_msg=kind)
    # Its TorchScript score is the old one, whose rows depend on the call size: recalibrating must not say otherwise.
    assert load_artifact(tmp_path / "out.ts")[1].scoring.batch_invariant is False


def test_a_rebuilt_split_that_differs_from_the_recorded_one_is_refused(digits_artifact, tmp_path):
    module, meta = load_artifact(digits_artifact)
    for change, named in (({"calib_sha256": "0" * 64}, "calib_sha256"), ({"n_val": 72}, "n_val"),
                          ({"val_fraction": 0.05}, "n_val")):
        tampered = tmp_path / "tampered.ts"
        save_artifact(module, tampered, dict(meta.to_dict(), data={**meta["data"], **change}))
        with pytest.raises(SystemExit, match=named):
            recalibrate(tampered, out=tmp_path / "out.ts")
        assert not (tmp_path / "out.ts").exists()


def test_an_artifact_without_a_latent_bank_is_given_one_with_its_own_weights(tmp_path):
    """``training.ood calibrate --latent-bank N``: the same model, exported again with a bank of its recorded
    train split, now offers fisher-bz2-nn; every other kind's calibration stays what it was."""
    model = trained(tmp_path, "--latent-bank", "0")
    module, meta = load_artifact(model)
    assert "latent_neighbour_distance" not in meta["methods"] and "fisher-bz2-nn" not in meta["scoring"]["kinds"]
    out = tmp_path / "banked.ts"
    calibration = recalibrate(model, out=out, latent_bank=50)
    banked, banked_meta = load_artifact(out)
    assert banked.latent_bank.shape == (50, 4) and "latent_neighbour_distance" in banked_meta["methods"]
    terms = banked_meta["scoring"]["kinds"]["fisher-bz2-nn"]["combination"]["terms"]
    assert [t["statistic"] for t in terms][-1] == "latent-nn" and len(calibration["scores"]["fisher-bz2-nn"]) == 144
    for kind, scores in meta["calibration"]["scores"].items():
        np.testing.assert_allclose(calibration["scores"][kind], scores, rtol=1e-5, atol=1e-3, err_msg=kind)
    x = torch.from_numpy(load_dataset("digits", seed=0).test.images[:16]).float() / 16
    torch.testing.assert_close(banked.encode(x), module.encode(x), atol=0, rtol=0)
    assert len({tuple(row) for row in banked.encode(x)[0].tolist()}) == 16  # distinct means: not a vacuous check


def test_an_artifact_without_a_latent_density_is_given_one_with_its_own_weights(tmp_path):
    """``training.ood calibrate --latent-density``: the same weights, exported again with a density fitted on its
    recorded train split, now offer density-bz2 as the default; every other kind's calibration stays what it
    was, and the bank it had is kept."""
    model = trained(tmp_path, "--no-latent-density")
    module, meta = load_artifact(model)
    assert "latent_log_density" not in meta["methods"] and "density-bz2" not in meta["scoring"]["kinds"]
    assert meta["scoring"]["default"] == "fisher-bz2-nn"
    out = tmp_path / "dense.ts"
    calibration = recalibrate(model, out=out, latent_density=True)
    dense, dense_meta = load_artifact(out)
    assert "latent_log_density" in dense_meta["methods"] and dense_meta["scoring"]["default"] == "density-bz2"
    assert dense_meta["latent_density"]["class_conditional"] and len(dense_meta["latent_density"]["classes"]) == 10
    assert len(calibration["scores"]["density-bz2"]) == 144
    for kind, scores in meta["calibration"]["scores"].items():
        np.testing.assert_allclose(calibration["scores"][kind], scores, rtol=1e-5, atol=1e-3, err_msg=kind)
    torch.testing.assert_close(dense.latent_bank, module.latent_bank, atol=0, rtol=0)
    x = torch.from_numpy(load_dataset("digits", seed=0).test.images[:16]).float() / 16
    torch.testing.assert_close(dense.encode(x), module.encode(x), atol=0, rtol=0)


def test_ood_evaluation_gives_the_model_images_in_its_own_shape(tmp_path, capsys):
    """A model trained on digits at --image-size 12 (8x8 natively) is evaluated on digits resized the same way."""
    model = trained(tmp_path, "--image-size", "12")
    command = ["evaluate", "--model", str(model), "--normal", "digits", "--holdout-class", "1"]
    normal, held_out = ood.test_sets(load_artifact(model)[1], "digits", holdout_class=1)
    test = load_dataset("digits", seed=0, image_size=12).test
    assert normal.shape[1:] == held_out.shape[1:] == (1, 12, 12)
    assert len(held_out) == (test.labels == 1).sum() and len(normal) + len(held_out) == len(test)
    assert train(["ood", *command]) == 0 and "AUROC" in capsys.readouterr().out
