"""/directions, /edit and /directions/compute on the session's trained digits model: edits do what their names
say (a classifier trained here grows more confident in the class, pixel:ink adds ink), a direction computed
from the images a stored one was built from is that direction, the same request gives the same bytes, and bad
input gets its 4xx. The client methods run against a real ``python -m service`` process."""

import base64
import io
import shutil

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from sklearn.linear_model import LogisticRegression

from service.app import create_app
from vae_client import AsyncVAEClient, BadRequest, ComputedDirection, Direction, Edits, VAEClient
from tests.helpers import png, variant
from tests.reliability.live_server import live_server
from training.data import to_8bit
from training.directions import add_direction
from vae_artifact.metadata import read_metadata

NPY = "application/x-npy"


def b64(images: np.ndarray) -> list:
    return [base64.b64encode(png(image)).decode("ascii") for image in images]


def files(images: np.ndarray, field: str = "file") -> list:
    return [(field, (f"{field}{i}.png", png(image), "image/png")) for i, image in enumerate(images)]


def pngs_to_array(items: list) -> np.ndarray:
    return np.stack([np.asarray(Image.open(io.BytesIO(base64.b64decode(item)))) for item in items])


@pytest.fixture(scope="module")
def labels(digits_dataset) -> np.ndarray:
    return digits_dataset.test.labels  # of digit_images, in order


@pytest.fixture(scope="module")
def classifier(digits_dataset) -> LogisticRegression:
    """Logistic regression on the pixels of the 8-bit train digits (about 96% test accuracy)."""
    train = to_8bit(digits_dataset.train.images, digits_dataset.levels)
    return LogisticRegression(max_iter=2000).fit(train.reshape(len(train), -1) / 255.0, digits_dataset.train.labels)


def test_directions_are_listed_with_vectors_only_when_asked(client, digits_artifact):
    stored = read_metadata(digits_artifact).directions
    listed = client.get("/directions").json()["directions"]
    assert [d["name"] for d in listed] == stored.names() and len(listed) == 13
    assert set(listed[0]) == {"name", "kind", "description", "n_pos", "n_neg", "norm", "auroc"}
    assert {d["kind"] for d in listed} == {"class", "pixel"}
    full = client.get("/directions", params={"vectors": "true"}).json()["directions"]
    for row in full:
        assert len(row["vector"]) == 16
        assert row["norm"] == pytest.approx(np.linalg.norm(row["vector"]), rel=1e-12)
        assert row["vector"] == list(stored.items[row["name"]].vector)


def test_a_class_edit_makes_a_classifier_more_confident(client, digit_images, labels, classifier):
    steps = [0.0, 1.0, 2.0, 3.0]
    finals = []
    for label in range(10):
        inputs = digit_images[labels != label][:16]  # other digits, edited toward this one
        response = client.post("/edit", json={"images": b64(inputs), "direction": f"class:{label}",
                                              "strengths": steps})
        assert response.status_code == 200, response.text
        edits = response.json()["edits"]
        # (16 inputs, 4 strengths) -> p(label) from the PNGs the client gets
        p = np.stack([classifier.predict_proba(pngs_to_array(e["images"]).reshape(len(steps), -1) / 255.0)[:, label]
                      for e in edits])
        assert (np.diff(p.mean(axis=0)) > 0).all(), (label, p.mean(axis=0))
        assert p[:, 0].mean() < 0.2, label  # unedited, they are other digits
        finals.append(p[:, -1].mean())
    assert np.mean(finals) > 0.75, finals


def test_pixel_ink_raises_mean_intensity_monotonically(client, digit_images):
    inputs = digit_images[:12]
    response = client.post("/edit", files=files(inputs), headers={"accept": NPY},
                           params=[("direction", "pixel:ink")] + [("strength", s) for s in (-2, -1, 0, 1, 2)])
    assert response.status_code == 200 and response.headers["content-type"] == NPY
    pixels = np.load(io.BytesIO(response.content))
    assert pixels.shape == (12, 5, 1, 8, 8) and pixels.dtype == np.float32
    intensity = pixels.mean(axis=(2, 3, 4))  # (inputs, strengths)
    assert (np.diff(intensity.mean(axis=0)) > 0).all(), intensity.mean(axis=0)
    assert (intensity[:, -1] > intensity[:, 0]).all()
    # The JSON form of the same edit: the PNGs are those pixel means, rounded.
    body = client.post("/edit", json={"images": b64(inputs), "direction": "pixel:ink"}).json()
    assert body["strengths"] == [-2.0, -1.0, 0.0, 1.0, 2.0]
    for i, edit in enumerate(body["edits"]):
        np.testing.assert_array_equal(pngs_to_array(edit["images"]),
                                      np.clip(np.rint(pixels[i, :, 0] * 255), 0, 255).astype(np.uint8))


def test_the_same_request_gives_the_same_bytes_alone_or_in_company(client, digit_images):
    request = {"images": b64(digit_images[:6]), "direction": "pixel:slant", "strengths": [-1.5, 0.0, 2.0]}
    first, second = client.post("/edit", json=request), client.post("/edit", json=request)
    assert first.status_code == 200 and first.content == second.content
    alone = client.post("/edit", json={**request, "images": request["images"][3:4]}).json()
    assert alone["edits"][0] == first.json()["edits"][3]
    examples = {"positive": b64(digit_images[:8]), "negative": b64(digit_images[8:20])}
    computed = [client.post("/directions/compute", json=examples).content for _ in range(2)]
    assert computed[0] == computed[1]


def test_edits_are_mu_plus_strength_times_the_vector(client, digit_images):
    inputs = digit_images[20:24]
    mu = client.post("/encode", files=files(inputs)).json()["mu"]
    vector = next(d["vector"] for d in client.get("/directions?vectors=true").json()["directions"]
                  if d["name"] == "class:2")
    by_vector = client.post("/edit", json={"z": mu, "vector": vector, "strengths": [0.0, 0.5, -3.0]}).json()
    z = np.array([edit["z"] for edit in by_vector["edits"]], dtype=np.float32)  # (N, S, D)
    np.testing.assert_array_equal(z[:, 0], np.float32(mu))
    expected = np.asarray(mu, np.float64)[:, None] + np.array([0.0, 0.5, -3.0])[None, :, None] * np.asarray(vector)
    np.testing.assert_array_equal(z, expected.astype(np.float32))
    # An image is edited from its posterior mean: by name from the image, by vector from its mu, the same.
    by_name = client.post("/edit", json={"images": b64(inputs), "direction": "class:2", "strengths": [0.0, 0.5, -3.0]})
    assert by_name.json() == by_vector
    decoded = client.post("/decode", json={"z": [row[0] for row in z.tolist()]}).json()["images"]
    assert decoded == [edit["images"][0] for edit in by_vector["edits"]]  # strength 0 decodes mu itself


@pytest.mark.parametrize("request_kwargs, status, code, says", [
    ({"json": {"images": ["x"], "direction": "nope"}}, 422, "unknown_direction", "class:0"),
    ({"params": {"direction": "nope"}, "files": "one"}, 422, "unknown_direction", "pixel:ink"),
    ({"json": {"z": [[0.0] * 16], "vector": [1.0] * 15}}, 422, "invalid_input", "latent size is 16"),
    ({"json": {"z": [[0.0] * 16], "vector": [1e39] * 16}}, 422, "invalid_input", "vector"),
    ({"json": {"z": [[0.0] * 16], "vector": [1.0] * 16, "strengths": [1.0] * 17}}, 413, "too_large", "17 strengths"),
    ({"json": {"z": [[0.0] * 16] * 13, "direction": "pixel:ink"}}, 413, "too_large", "65 images"),
    ({"json": {"z": [[0.0] * 16], "direction": "pixel:ink", "strengths": []}}, 422, "invalid_input", "strengths"),
    ({"json": {"z": [[3e38] * 16], "vector": [1.0] * 16, "strengths": [1e38]}}, 422, "invalid_input", "float32"),
    ({"params": [("direction", "pixel:ink"), ("strength", "inf")], "files": "one"}, 422, "invalid_input", "finite"),
    ({"params": [("direction", "pixel:ink"), ("strength", "nan")], "files": "one"}, 422, "invalid_input", "finite"),
    ({"params": [("direction", "pixel:ink")] + [("strength", 1)] * 17, "files": "one"}, 413, "too_large", "limit"),
    ({"files": "one"}, 422, "invalid_input", "exactly one of direction"),
    ({"json": {"z": [[0.0] * 16], "images": ["x"], "direction": "pixel:ink"}}, 422, "invalid_input", "exactly one"),
    ({"json": {"z": [[0.0] * 16], "direction": "pixel:ink", "vector": [0.0] * 16}}, 422, "invalid_input",
     "exactly one"),
    ({"json": {"z": [[0.0] * 16], "direction": "pixel:ink"}, "params": {"direction": "pixel:ink"}}, 422,
     "invalid_input", "in the body"),
    ({"json": {"z": [[0.0] * 16], "direction": "pixel:ink", "colour": 1}}, 422, "invalid_input", "colour"),
    ({"content": b"hello", "headers": {"content-type": "text/plain"}, "params": {"direction": "pixel:ink"}}, 415,
     "unsupported_media_type", "multipart"),
])
def test_bad_edits_get_their_4xx(client, digit_images, request_kwargs, status, code, says):
    kwargs = dict(request_kwargs)
    if kwargs.get("files") == "one":
        kwargs["files"] = files(digit_images[:1])
    response = client.post("/edit", **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and says in error["message"], error


@pytest.mark.parametrize("make, status, code, says", [
    (lambda x: {"json": {"positive": b64(x[:3]), "negative": []}}, 422, "invalid_input", "negative"),
    (lambda x: {"files": files(x[:3], "positive")}, 422, "invalid_input", "no negative images"),
    (lambda x: {"files": files(x[:3], "file")}, 422, "invalid_image", "positive or negative"),
    (lambda x: {"files": files(x[:33], "positive") + files(x[33:65], "negative")}, 413, "too_large", "64"),
    (lambda x: {"json": {"positive": b64(x[:33]), "negative": b64(x[33:65])}}, 413, "too_large", "64"),
    (lambda x: {"json": {"positive": ["bm90IGFuIGltYWdl"], "negative": b64(x[:1])}}, 422, "invalid_image", "image 0"),
    (lambda x: {"content": b"x", "headers": {"content-type": "text/plain"}}, 415, "unsupported_media_type", "json"),
])
def test_bad_examples_get_their_4xx(client, digit_images, make, status, code, says):
    response = client.post("/directions/compute", **make(digit_images))
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and says in error["message"], error


def test_computed_directions_hold_out_and_count(client, digit_images, labels):
    sevens, ones = digit_images[labels == 7][:20], digit_images[labels == 1][:20]
    multipart = client.post("/directions/compute", files=files(sevens, "positive") + files(ones, "negative"))
    as_json = client.post("/directions/compute", json={"positive": b64(sevens), "negative": b64(ones)})
    assert multipart.status_code == 200 and multipart.json() == as_json.json()
    body = multipart.json()
    assert (body["n_pos"], body["n_neg"]) == (20, 20) and body["auroc"] > 0.9 and len(body["vector"]) == 16
    assert body["norm"] == pytest.approx(np.linalg.norm(body["vector"]))
    few = client.post("/directions/compute", json={"positive": b64(sevens[:1]), "negative": b64(ones)}).json()
    assert few["auroc"] is None and few["n_pos"] == 1  # nothing to hold out on one side


def test_metrics_count_the_editing_endpoints_and_the_key_guards_them(client, settings, digit_images):
    client.get("/directions")
    client.post("/edit", json={"z": [[0.0] * 16], "direction": "nope"})
    client.post("/edit", json={"z": [[0.0] * 16], "direction": "pixel:ink"})
    client.post("/directions/compute", json={"positive": b64(digit_images[:2]), "negative": b64(digit_images[2:4])})
    text = client.get("/metrics").text
    counted = {(s.labels["endpoint"], s.labels["status"], s.labels["role"])
               for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == "vae_requests_total"}
    assert {("/directions", "200", "other"), ("/edit", "422", "model"), ("/edit", "200", "model"),
            ("/directions/compute", "200", "model")} <= counted
    keyed = TestClient(create_app(variant(settings, api_key="k" * 16)))  # no lifespan: the key is checked first
    for method, path in (("GET", "/directions"), ("POST", "/edit"), ("POST", "/directions/compute")):
        response = keyed.request(method, path, json={})
        assert response.status_code == 401 and response.json()["error"]["code"] == "unauthorized", path


# -- the client, against a real server process ---------------------------------------------------------------


@pytest.fixture(scope="module")
def served(digits_artifact, digits_dataset, digit_images, labels, tmp_path_factory):
    """A copy of the digits artifact with a custom direction added from folders of sevens and ones, served by
    ``python -m service`` with room for every train image in one request; and the examples it was built from."""
    root = tmp_path_factory.mktemp("edit")
    examples = {"positive": digit_images[labels == 7][:24], "negative": digit_images[labels == 1][:18]}
    for side, images in examples.items():
        (root / side).mkdir()
        for i, image in enumerate(images):
            Image.fromarray(image[0]).save(root / side / f"{i:02d}.png")
    model = root / "vae.ts"
    shutil.copy(digits_artifact, model)
    add_direction(model, "seven-not-one", root / "positive", root / "negative")
    with live_server(model, root, max_rows=2048, processes=1, log_level="warning") as server:
        yield server.url, examples


def test_client_compute_reproduces_stored_directions(served, digits_dataset):
    url, examples = served
    with VAEClient(base_url=url) as vae:
        stored = {d.name: d for d in vae.directions(vectors=True)}
        assert all(isinstance(d, Direction) and d.vector.shape == (16,) for d in stored.values())
        assert vae.directions()[0].vector is None
        custom = vae.compute_direction(examples["positive"], examples["negative"])
        assert isinstance(custom, ComputedDirection)
        expected = stored["seven-not-one"]
        assert (custom.n_pos, custom.n_neg, expected.n_pos, expected.n_neg) == (24, 18, 24, 18)
        np.testing.assert_allclose(custom.vector, expected.vector, atol=1e-6)
        assert custom.auroc == pytest.approx(expected.auroc, abs=1e-9)
        # class:3 was built at training time from the whole train split: the same images give the same vector.
        train = to_8bit(digits_dataset.train.images, digits_dataset.levels)
        train_labels = digits_dataset.train.labels
        three = vae.compute_direction(train[train_labels == 3], train[train_labels != 3])
        assert (three.n_pos, three.n_neg) == (stored["class:3"].n_pos, stored["class:3"].n_neg)
        np.testing.assert_allclose(three.vector, stored["class:3"].vector, atol=1e-4)


async def test_client_edits_sync_and_async_agree(served, digit_images):
    url, _ = served
    inputs = digit_images[:3]
    with VAEClient(base_url=url) as vae:
        edits = vae.edit(inputs, direction="seven-not-one", strengths=[0, 1, 2])
        pixels = vae.edit_array(inputs, direction="seven-not-one", strengths=[0, 1, 2])
        by_vector = vae.edit(z=edits.z[:, 0], vector=vae.directions(vectors=True)[-1].vector, strengths=[0, 1, 2])
        with pytest.raises(BadRequest) as refused:
            vae.edit(inputs, direction="nope")
    assert isinstance(edits, Edits) and edits.z.shape == (3, 3, 16) and edits.strengths.tolist() == [0, 1, 2]
    assert len(edits.images) == 3 and all(len(row) == 3 and row[0].size == (8, 8) for row in edits.images)
    assert pixels.shape == (3, 3, 1, 8, 8)
    np.testing.assert_array_equal(np.stack([[np.asarray(im) for im in row] for row in edits.images]),
                                  np.clip(np.rint(pixels[:, :, 0] * 255), 0, 255).astype(np.uint8))
    np.testing.assert_array_equal(by_vector.z, edits.z)
    assert refused.value.status == 422 and refused.value.code == "unknown_direction"
    async with AsyncVAEClient(base_url=url) as vae:
        again = await vae.edit(inputs, direction="seven-not-one", strengths=[0, 1, 2])
        listed = await vae.directions()
    np.testing.assert_array_equal(again.z, edits.z)
    assert [d.name for d in listed][-1] == "seven-not-one"
