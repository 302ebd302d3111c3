"""POST /v1/model/reload in one process (the app in-process): the answers name the model that computed them, a
reload switches every later answer, a refused file or path changes nothing, and reloading is off unless enabled.
Real server processes under load: tests/reliability/test_reload.py."""

import shutil

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.config import Settings
from tests.helpers import train_artifact, wait_ready


@pytest.fixture(scope="module")
def model_dir(digits_artifact, tmp_path_factory):
    folder = tmp_path_factory.mktemp("reload-models")
    shutil.copyfile(digits_artifact, folder / "a.ts")
    other = train_artifact(tmp_path_factory, "reload-other", ["--data", "digits", "--device", "cpu", "--epochs", "2",
                                                              "--seed", "3", "--eval-k", "16", "--no-report",
                                                              "--quiet"])
    shutil.copyfile(other, folder / "b.ts")
    (folder / "broken.ts").write_bytes(b"not an artifact")
    return folder


def test_a_reload_switches_the_model_every_answer_names(model_dir, digit_images):
    settings = Settings(model_path=model_dir / "a.ts", device="cpu", allow_reload=True)
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        first = client.get("/v1/model").json()["sha256"]
        before = client.post("/sample", json={"n": 2, "seed": 1})
        assert before.headers["x-model-sha256"] == first
        swapped = client.post("/v1/model/reload", json={"path": "b.ts"})
        assert swapped.status_code == 200, swapped.text
        second = swapped.json()["sha256"]
        assert swapped.json() == {"sha256": second, "previous_sha256": first, "processes": 1} and second != first
        after = client.post("/sample", json={"n": 2, "seed": 1})
        assert after.headers["x-model-sha256"] == second and after.json()["images"] != before.json()["images"]
        assert client.get("/v1/model").json()["sha256"] == second
        assert client.get("/readyz").status_code == 200
        # The protocol's answers name it too; and reloading the configured file again goes back to it.
        infer = client.post("/v2/models/encoder/infer", json={"inputs": [{
            "name": "images", "datatype": "UINT8", "shape": [1, 1, 8, 8], "data": digit_images[0].ravel().tolist()}]})
        assert infer.json()["model_version"] == second and infer.headers["x-model-sha256"] == second
        assert client.post("/v1/model/reload").json() == {"sha256": first, "previous_sha256": second, "processes": 1}
        assert client.post("/v1/model/reload").json()["sha256"] == first  # the same file: nothing to do
        metrics = client.get("/metrics").text
        assert f'vae_process_model{{sha256="{first}"}} 1.0' in metrics
        assert 'vae_reloads_total{outcome="switched"} 2.0' in metrics
        assert 'vae_reloads_total{outcome="unchanged"} 1.0' in metrics


@pytest.mark.parametrize("body, status, code", [
    ({"path": "broken.ts"}, 422, "artifact_refused"),
    ({"path": "../a.ts"}, 403, "path_not_allowed"),
    ({"path": "/etc/hostname"}, 403, "path_not_allowed"),
    ({"path": "nowhere.ts"}, 404, "model_not_found"),
    ({"path": 3}, 422, "invalid_input"),
    ({"model": "b.ts"}, 422, "invalid_input"),
])
def test_a_refused_reload_changes_nothing(model_dir, body, status, code):
    settings = Settings(model_path=model_dir / "a.ts", device="cpu", allow_reload=True)
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        first = client.get("/v1/model").json()["sha256"]
        refused = client.post("/v1/model/reload", json=body)
        assert (refused.status_code, refused.json()["error"]["code"]) == (status, code), refused.text
        assert client.post("/sample", json={"n": 1, "seed": 1}).headers["x-model-sha256"] == first


def test_a_symbolic_link_out_of_the_model_directory_is_refused(model_dir, digits_artifact, tmp_path):
    outside = tmp_path / "elsewhere.ts"
    shutil.copyfile(digits_artifact, outside)
    (model_dir / "link.ts").symlink_to(outside)
    try:
        settings = Settings(model_path=model_dir / "a.ts", device="cpu", allow_reload=True)
        with TestClient(create_app(settings)) as client:
            wait_ready(client)
            refused = client.post("/v1/model/reload", json={"path": "link.ts"})
            assert refused.status_code == 403 and "outside the model directory" in refused.text
    finally:
        (model_dir / "link.ts").unlink()


def test_reload_is_off_unless_enabled_and_needs_the_key(model_dir):
    with TestClient(create_app(Settings(model_path=model_dir / "a.ts", device="cpu"))) as client:
        wait_ready(client)
        off = client.post("/v1/model/reload")
        assert off.status_code == 403 and off.json()["error"]["code"] == "reload_disabled"
    keyed = Settings(model_path=model_dir / "a.ts", device="cpu", allow_reload=True, api_key="k" * 16,
                     metrics_public=True)
    with TestClient(create_app(keyed)) as client:
        assert client.post("/v1/model/reload", json={"path": "b.ts"}).status_code == 401


def test_a_model_directory_elsewhere(model_dir, digits_artifact, tmp_path):
    shutil.copyfile(digits_artifact, tmp_path / "served.ts")
    settings = Settings(model_path=tmp_path / "served.ts", device="cpu", allow_reload=True, model_dir=model_dir)
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        assert client.post("/v1/model/reload", json={"path": "b.ts"}).status_code == 200
        assert np.isfinite(client.post("/sample", json={"n": 1}).json()["z"][0][0])
