"""The served OpenAPI document states what this server accepts: the limits of its settings and the loaded model
(latent size, rows, n, steps, K, score kinds) are in the schemas, a request at each stated limit is served and
one just past it is refused with a 4xx. (test_schemathesis.py fuzzes the whole document; this is the fast part.)
"""

import base64
import io

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.app import create_app
from service.config import Settings

LIMITS = dict(max_rows=12, max_n=20, max_steps=30, max_k=40)


@pytest.fixture(scope="module")
def client(digits_artifact):
    settings = Settings(model_path=digits_artifact, device="cpu", max_batch_rows=16, buckets=[4, 16], **LIMITS)
    with TestClient(create_app(settings)) as client:
        while client.get("/readyz").status_code != 200:
            pass
        yield client


@pytest.fixture(scope="module")
def doc(client) -> dict:
    return client.get("/openapi.json").json()


@pytest.fixture(scope="module")
def model(client) -> dict:
    return client.get("/v1/model").json()


def body(doc: dict, path: str, media: str = "application/json") -> dict:
    return doc["paths"][path]["post"]["requestBody"]["content"][media]["schema"]


def query(doc: dict, path: str, name: str) -> dict:
    return next(p["schema"] for p in doc["paths"][path]["post"]["parameters"] if p["name"] == name)


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (8, 8), 90).save(buffer, format="PNG")
    return buffer.getvalue()


def test_the_document_states_the_limits(doc, model):
    d = model["latent_dim"]
    z = body(doc, "/decode")["properties"]["z"]
    assert (z["minItems"], z["maxItems"]) == (1, LIMITS["max_rows"])
    assert (z["items"]["minItems"], z["items"]["maxItems"]) == (d, d)
    assert z["items"]["items"]["maximum"] == -z["items"]["items"]["minimum"] == 3.4028234663852886e38
    assert body(doc, "/sample")["properties"]["n"]["maximum"] == LIMITS["max_n"]
    assert query(doc, "/interpolate", "steps")["maximum"] == LIMITS["max_steps"]
    ends = body(doc, "/interpolate")
    assert ends["properties"]["z"]["anyOf"][0]["items"]["maxItems"] == d and len(ends["oneOf"]) == 2
    assert body(doc, "/interpolate", "multipart/form-data")["properties"]["file"]["maxItems"] == 2
    for path in ("/encode", "/anomaly-score"):
        assert body(doc, path)["properties"]["images"]["maxItems"] == LIMITS["max_rows"]
        assert body(doc, path, "multipart/form-data")["properties"]["file"]["maxItems"] == LIMITS["max_rows"]
    assert query(doc, "/anomaly-score", "k")["anyOf"][0]["maximum"] == LIMITS["max_k"]
    kinds = sorted(model["metadata"]["scoring"]["kinds"])
    assert query(doc, "/anomaly-score", "score")["anyOf"][0]["enum"] == kinds
    edit = body(doc, "/edit")["properties"]
    assert edit["images"]["anyOf"][0]["maxItems"] == edit["z"]["anyOf"][0]["maxItems"] == LIMITS["max_rows"]
    assert edit["z"]["anyOf"][0]["items"]["maxItems"] == edit["vector"]["anyOf"][0]["maxItems"] == d
    assert edit["strengths"]["maxItems"] == query(doc, "/edit", "strength")["anyOf"][0]["maxItems"] == 16
    assert body(doc, "/edit", "multipart/form-data")["properties"]["file"]["maxItems"] == LIMITS["max_rows"]
    for media in ("application/json", "multipart/form-data"):
        groups = body(doc, "/directions/compute", media)["properties"]
        assert groups["positive"]["maxItems"] == groups["negative"]["maxItems"] == LIMITS["max_rows"] - 1


def test_at_each_limit_served_and_past_it_refused(client, model):
    d, rows, image = model["latent_dim"], LIMITS["max_rows"], png()

    def status(method: str, path: str, **kwargs) -> int:
        return client.request(method, path, **kwargs).status_code

    assert status("POST", "/decode", json={"z": [[0.0] * d] * rows}) == 200
    assert status("POST", "/decode", json={"z": [[0.0] * d] * (rows + 1)}) == 413
    assert status("POST", "/decode", json={"z": [[3.4028234663852886e38] * d]}) == 200
    assert status("POST", "/decode", json={"z": [[0.0] * (d + 1)]}) == 422
    assert status("POST", "/decode", json={"z": [[3.5e38] + [0.0] * (d - 1)]}) == 422
    assert status("POST", "/sample", json={"n": LIMITS["max_n"]}) == 200
    assert status("POST", "/sample", json={"n": LIMITS["max_n"] + 1}) == 413
    ends = {"z": [[0.0] * d, [1.0] * d]}
    assert status("POST", f"/interpolate?steps={LIMITS['max_steps']}", json=ends) == 200
    assert status("POST", f"/interpolate?steps={LIMITS['max_steps'] + 1}", json=ends) == 413
    assert status("POST", "/interpolate", json={**ends, "images": None}) == 200  # exactly one of the two given
    assert status("POST", "/interpolate", json={"z": None, "images": None}) == 422
    files = {"files": [("file", ("a.png", image, "image/png"))]}
    for kind in model["metadata"]["scoring"]["kinds"]:
        assert status("POST", f"/anomaly-score?k={LIMITS['max_k']}&score={kind}", **files) == 200
    assert status("POST", f"/anomaly-score?k={LIMITS['max_k'] + 1}", **files) == 413
    assert status("POST", "/anomaly-score?score=no-such-kind", **files) == 422
    z = [[0.0] * d]
    assert status("POST", "/edit", json={"z": z, "vector": [1.0] * d, "strengths": [0.5] * 12}) == 200
    assert status("POST", "/edit", json={"z": z, "vector": [1.0] * d, "strengths": [0.5] * 17}) == 413
    assert status("POST", "/edit", json={"z": z, "vector": [1.0] * (d + 1)}) == 422
    assert status("POST", "/edit", json={"z": z * 3, "vector": [1.0] * d, "strengths": [0.5] * 5}) == 413  # 15 > 12
    groups = {"positive": [base64.b64encode(image).decode()] * (rows - 1)}
    assert status("POST", "/directions/compute", json={**groups, "negative": groups["positive"][:1]}) == 200
    assert status("POST", "/directions/compute", json={**groups, "negative": groups["positive"][:2]}) == 413


@pytest.mark.parametrize("angle", [np.pi / 2, np.pi - 2e-6])
def test_every_interpolation_between_ends_in_the_document_is_finite(client, doc, model, angle):
    # Two ends at the stated maximum norm, at right angles or almost opposite: far along the great circle the
    # path outgrows its ends (at pi / 2 by sqrt(2)), and from the float32 maximum it would overflow.
    d = model["latent_dim"]
    big = body(doc, "/interpolate")["properties"]["z"]["anyOf"][0]["items"]["items"]["maximum"]
    a, b = [big] + [0.0] * (d - 1), [big * np.cos(angle), big * np.sin(angle)] + [0.0] * (d - 2)
    response = client.post("/interpolate?steps=9&method=slerp", json={"z": [a, b]})
    assert response.status_code == 200, response.text
    assert np.isfinite(np.array(response.json()["z"], dtype=np.float64)).all()
    past = [big * 10] + [0.0] * (d - 1)
    assert client.post("/interpolate", json={"z": [past, b]}).status_code == 422


def test_before_the_model_is_loaded_the_generic_document_is_served(digits_artifact):
    doc = create_app(Settings(model_path=digits_artifact)).openapi()
    assert "maxItems" not in body(doc, "/decode")["properties"]["z"]


def test_numbers_are_json_numbers(client, model):
    # The schema says integer / number: JSON's true and "3" are neither (pydantic's lax mode took both), 3.0 is
    # an integer to JSON Schema.
    d = model["latent_dim"]
    for bad in ({"n": True}, {"n": "3"}, {"seed": False}, {"temperature": "1"}, {"n": 2.5}):
        assert client.post("/sample", json=bad).status_code == 422, bad
    assert client.post("/sample", json={"n": 3.0, "seed": 7.0, "temperature": 1}).status_code == 200
    assert client.post("/decode", json={"z": [[True] + [0.0] * (d - 1)]}).status_code == 422
    assert client.post("/decode", json={"z": [[1] + [0.0] * (d - 1)]}).status_code == 200
