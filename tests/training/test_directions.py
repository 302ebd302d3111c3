"""Latent directions in the artifact: the contract's math (AUROC as scikit-learn computes it), the pixel
statistics, the directions training stores and how they are checked, and ``python -m training.directions add``."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from training.data import to_8bit
from training.cli.directions import main as directions_cli
from training.directions import directions_section, pixel_statistics, quartiles
from vae_artifact import directions as contract
from vae_artifact.directions import DirectionsSection
from vae_artifact.errors import ArtifactError
from vae_artifact.io import load_artifact, weights_sha256
from vae_artifact.metadata import Metadata, read_metadata
from tests.helpers import FORMAT1



@pytest.mark.parametrize("seed", range(6))
def test_auroc_is_scikit_learns_with_ties(seed):
    rng = np.random.default_rng(seed)
    # Few distinct values: many ties within and across the two sides (seed 0: every score equal).
    values = 1 if seed == 0 else 1 + seed
    pos, neg = rng.integers(0, values, rng.integers(1, 40)), rng.integers(0, values, rng.integers(1, 40))
    expected = roc_auc_score(np.r_[np.ones(len(pos)), np.zeros(len(neg))], np.r_[pos, neg]) if seed else 0.5
    assert contract.auroc(pos, neg) == pytest.approx(expected, abs=1e-12)


def test_auroc_of_continuous_scores_and_its_extremes():
    rng = np.random.default_rng(0)
    pos, neg = rng.normal(1, 1, 300), rng.normal(0, 1, 200)
    assert contract.auroc(pos, neg) == pytest.approx(roc_auc_score(np.r_[np.ones(300), np.zeros(200)],
                                                                   np.r_[pos, neg]), abs=1e-12)
    assert contract.auroc([2, 3], [0, 1]) == 1.0 and contract.auroc([0, 1], [2, 3]) == 0.0
    with pytest.raises(ValueError):
        contract.auroc([], [1.0])


def test_direction_is_the_difference_of_means_and_edits_add_it():
    rng = np.random.default_rng(1)
    pos, neg = rng.normal(2, 1, (30, 4)), rng.normal(0, 1, (50, 4))
    v = contract.direction(pos, neg)
    np.testing.assert_array_equal(v, pos.mean(0) - neg.mean(0))
    z = contract.edit(neg[:3], v, [-1.0, 0.0, 2.5])
    assert z.shape == (3, 3, 4) and z.dtype == np.float32
    np.testing.assert_array_equal(z[:, 1], neg[:3].astype(np.float32))
    np.testing.assert_array_equal(z[:, 2], (neg[:3] + 2.5 * v).astype(np.float32))


def test_cross_fitted_auroc_holds_out_and_is_deterministic():
    rng = np.random.default_rng(2)
    pos, neg = rng.normal(1, 1, (40, 8)), rng.normal(0, 1, (40, 8))
    first = contract.cross_fitted_auroc(pos, neg)
    assert first == contract.cross_fitted_auroc(pos.copy(), neg.copy())  # the same folds every time
    assert 0.7 < first < 1.0
    # Pure noise: fitting on all and scoring the same examples looks good; held out, it does not.
    noise = [(rng.normal(0, 1, (20, 64)), rng.normal(0, 1, (20, 64))) for _ in range(20)]
    assert np.mean([contract.projection_auroc(contract.direction(a, b), a, b) for a, b in noise]) > 0.9
    assert 0.4 < np.mean([contract.cross_fitted_auroc(a, b) for a, b in noise]) < 0.6
    assert contract.cross_fitted_auroc(pos[:1], neg) is None  # nothing to hold out on one side


def test_pixel_statistics_measure_what_they_name():
    canvas = np.zeros((4, 1, 8, 8), np.uint8)
    canvas[0, 0, 2:4, 2:4] = 255  # a 2x2 blot
    canvas[1, 0, 1:7, 1:7] = 255  # a 6x6 blot: more ink, a larger box
    for row in range(8):
        canvas[2, 0, row, 7 - row] = 255  # "/": leans right
        canvas[3, 0, row, row] = 255  # "\": leans left
    stats = pixel_statistics(canvas)
    assert stats["ink"][1] > stats["ink"][0] > 0
    np.testing.assert_allclose(stats["size"][:2], [4 / 64, 36 / 64])
    assert stats["slant"][2] > 0 > stats["slant"][3]
    rgb = np.zeros((2, 3, 4, 4), np.uint8)
    rgb[0, 0] = 200  # pure red: saturated
    rgb[1] = 200  # gray: no saturation, brighter
    color = pixel_statistics(rgb)
    assert color["saturation"][0] == 1.0 and color["saturation"][1] == 0.0
    assert color["brightness"][1] > color["brightness"][0] and set(color) == {"brightness", "contrast", "saturation"}
    assert quartiles(np.ones(10)) is None  # a constant statistic separates nothing


def test_training_stores_checked_directions(digits_artifact, digits_dataset):
    meta = read_metadata(digits_artifact)
    names = meta.directions.names()
    assert names == [f"class:{c}" for c in range(10)] + ["pixel:ink", "pixel:size", "pixel:slant"]
    train_labels = digits_dataset.train.labels
    for direction in meta.directions:
        assert direction.description and len(direction.vector) == meta.latent_dim
        assert direction.norm == pytest.approx(np.linalg.norm(direction.vector)) and direction.norm > 0
        if direction.kind == "class":
            label = int(direction.name.split(":")[1])
            assert (direction.n_pos, direction.n_neg) == ((train_labels == label).sum(), (train_labels != label).sum())
            assert direction.auroc > 0.75, direction  # held out: the test split's labels
        else:
            assert direction.n_pos >= len(train_labels) // 4 and direction.auroc is not None
    assert meta.directions.items["pixel:ink"].auroc > 0.6
    # Class directions are built from the train split: recomputing one from it gives the stored vector.
    module, _ = load_artifact(digits_artifact)
    from training.directions import posterior_means

    mu = posterior_means(module.encode, to_8bit(digits_dataset.train.images, digits_dataset.levels))
    np.testing.assert_allclose(contract.direction(mu[train_labels == 3], mu[train_labels != 3]),
                               meta.directions.items["class:3"].vector, atol=1e-5)


def test_unlabelled_data_gets_pixel_directions(digits_artifact, digits_dataset):
    module, meta = load_artifact(digits_artifact)
    train = to_8bit(digits_dataset.train.images, digits_dataset.levels)
    test = to_8bit(digits_dataset.test.images, digits_dataset.levels)
    unlabelled = directions_section(module.encode, (train, np.full(len(train), -1)), (test, np.full(len(test), -1)))
    checked = DirectionsSection.from_dict(unlabelled, meta.latent_dim)
    assert checked.names() == ["pixel:ink", "pixel:size", "pixel:slant"]
    for name in checked.names():  # the same images and encoder as training: the stored vectors
        np.testing.assert_allclose(checked.items[name].array, meta.directions.items[name].array, atol=1e-5)
        assert checked.items[name].auroc == pytest.approx(meta.directions.items[name].auroc, abs=1e-3)


def test_older_artifacts_have_no_directions():
    assert len(read_metadata(FORMAT1).directions) == 0


@pytest.mark.parametrize("change, message", [
    (lambda items: items[0].update(vector=[0.0]), "vector must be a list of"),
    (lambda items: items[0].update(vector=[float("nan")] * len(items[0]["vector"])), "non-finite"),
    (lambda items: items[0].update(kind="mood"), "kind"),
    (lambda items: items[0].update(name="has space"), "name"),
    (lambda items: items[0].update(auroc=1.5), "auroc"),
    (lambda items: items[0].update(n_pos=0), "n_pos"),
    (lambda items: items.append(dict(items[0])), "appears twice"),
])
def test_a_broken_directions_section_is_refused(digits_artifact, change, message):
    document = read_metadata(digits_artifact).to_dict()
    change(document["directions"]["items"])
    with pytest.raises(ArtifactError, match=message):
        Metadata.from_dict(document)


def _folder(path: Path, images: np.ndarray) -> Path:
    path.mkdir(parents=True)
    for i, image in enumerate(images):
        Image.fromarray(image[0]).save(path / f"{i:03d}.png")
    return path


def test_add_writes_a_direction_and_keeps_the_weights(digits_artifact, digits_dataset, tmp_path, capsys):
    test = to_8bit(digits_dataset.test.images, digits_dataset.levels)
    labels = digits_dataset.test.labels
    positive = _folder(tmp_path / "sevens", test[labels == 7][:20])
    negative = _folder(tmp_path / "ones", test[labels == 1][:25])
    model = tmp_path / "vae.ts"
    shutil.copy(digits_artifact, model)
    before = load_artifact(model)
    assert directions_cli(["add", "--model", str(model), "--name", "seven-not-one", "--positive", str(positive),
                           "--negative", str(negative), "--description", "sevens minus ones"]) == 0
    printed = json.loads(capsys.readouterr().out)
    module, meta = load_artifact(model)  # the weights hash is checked on load
    assert meta.weights_sha256 == before[1].weights_sha256 == weights_sha256(module)
    added = meta.directions.items["seven-not-one"]
    assert (added.kind, added.description, added.n_pos, added.n_neg) == ("custom", "sevens minus ones", 20, 25)
    assert printed["name"] == "seven-not-one" and printed["auroc"] == added.auroc > 0.9
    assert meta.directions.names()[:-1] == before[1].directions.names()  # the others are kept, in order
    assert {k: v for k, v in meta.items() if k != "directions"} == {k: v for k, v in before[1].items()
                                                                     if k != "directions"}
    # The same name again is refused unless replaced; reserved prefixes are refused.
    with pytest.raises(SystemExit, match="already has"):
        directions_cli(["add", "--model", str(model), "--name", "seven-not-one", "--positive", str(negative),
                        "--negative", str(positive)])
    assert directions_cli(["add", "--model", str(model), "--name", "seven-not-one", "--positive", str(negative),
                           "--negative", str(positive), "--replace"]) == 0
    replaced = load_artifact(model)[1].directions.items["seven-not-one"]
    np.testing.assert_allclose(replaced.array, -added.array, atol=1e-12)
    with pytest.raises(SystemExit, match="reserved"):
        directions_cli(["add", "--model", str(model), "--name", "class:7", "--positive", str(positive),
                        "--negative", str(negative)])
    with pytest.raises(SystemExit, match="not a folder"):
        directions_cli(["add", "--model", str(model), "--name", "x", "--positive", str(tmp_path / "missing"),
                        "--negative", str(negative)])


def test_list_prints_every_direction_without_its_vector(digits_artifact, capsys):
    assert directions_cli(["list", "--model", str(digits_artifact)]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    stored = load_artifact(digits_artifact)[1].directions
    assert [row["name"] for row in printed] == stored.names() and len(printed) >= 2
    for row in printed:
        assert "vector" not in row
        assert row == stored.items[row["name"]].to_dict(vector=False)
