"""The contract's one check of metadata.json: every reader gets typed values or a clear refusal, never a
KeyError or AttributeError from deep inside the service."""

import pytest

from vae_artifact.errors import ArtifactError
from vae_artifact.metadata import DEFAULT_K, FORMAT_VERSION, Metadata

MODEL = {"image": {"channels": 1, "height": 8, "width": 8}, "latent_dim": 4}


def document(**sections):
    return {"format_version": FORMAT_VERSION, "model": MODEL, **sections}


def test_a_minimal_document_gets_the_documented_defaults():
    meta = Metadata.from_dict(document())
    assert (meta.image.num_dims, meta.latent_dim, meta.levels, meta.likelihood) == (64, 4, 256, "logistic")
    assert meta.scoring.k == DEFAULT_K and meta.scoring.default == "nll" and list(meta.scoring.kinds) == ["nll"]
    assert meta.calibration is None and not meta.scoring.batch_invariant
    assert meta == document() and meta.to_dict() == document()  # also the document itself


def test_calibration_scores_are_read_sorted():
    meta = Metadata.from_dict(document(calibration={"k": 8, "n": 3, "scores": {"nll": [3.0, 1.0, 2.0]}}))
    assert meta.calibration.scores["nll"] == (1.0, 2.0, 3.0) and meta.calibration.k == 8


@pytest.mark.parametrize("bad, message", [
    ({"model": MODEL}, "format_version"),
    (document(format_version=FORMAT_VERSION + 1), "newer than this"),
    ({"format_version": 1}, "model.latent_dim"),
    ({"format_version": 1, "model": {"image": {"channels": "one", "height": 8, "width": 8}, "latent_dim": 4}},
     "expected an integer"),
    ({"format_version": 1, "model": {**MODEL, "latent_dim": 0}}, "must be positive"),
    ({"format_version": 1, "model": {**MODEL, "likelihood": "gaussian"}}, "unknown likelihood"),
    (document(scoring={"k": 0}), "scoring.k"),
    (document(scoring={"kinds": ["nll"]}), "scoring.kinds"),
    (document(calibration=[1.0, 2.0]), "mangles"),
    (document(calibration={"k": 8, "scores": {"nll": [1.0, float("nan")]}}), "non-finite"),
])
def test_mangled_documents_are_refused_with_the_reason(bad, message):
    with pytest.raises(ArtifactError, match=message):
        Metadata.from_dict(bad, "test.ts")
