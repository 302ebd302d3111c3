"""Health, metrics, metadata, docs, auth and the error contract for bad requests."""

import hashlib

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import SERVED_DEVICE, png, variant, wait_ready
from service.app import create_app


def metric_samples(client) -> dict:
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def test_health_endpoints(client):
    assert client.get("/livez").json() == {"status": "alive"}
    assert client.get("/readyz").json() == {"status": "ready"}


def test_model_metadata_describes_the_served_file(client, digits_artifact):
    body = client.get("/v1/model").json()
    assert body["sha256"] == hashlib.sha256(digits_artifact.read_bytes()).hexdigest()
    assert body["image"] == {"channels": 1, "height": 8, "width": 8}
    assert body["device"] == SERVED_DEVICE and body["score_k"] == 32
    assert "scores" not in body["metadata"]["calibration"]  # thousands of floats stay out of the response
    assert body["metadata"]["evaluation"]["iw_nll_nats"] > 0


def test_metrics_parse_and_move_with_traffic(client, digit_images):
    before = metric_samples(client)
    assert client.post("/encode", files=[("file", ("a.png", png(digit_images[0]), "image/png"))]).status_code == 200
    assert client.post("/decode", json={"z": [[0.0]]}).status_code == 422
    after = metric_samples(client)

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert delta("vae_requests_total", endpoint="/encode", status="200", role="model") == 1
    assert delta("vae_requests_total", endpoint="/decode", status="422", role="model") == 1
    assert delta("vae_request_duration_seconds_count", endpoint="/encode", status="200", role="model") == 1
    assert delta("vae_batch_rows_sum", kernel="encode") == 1
    assert delta("vae_model_seconds_count", kernel="encode") == 1
    assert delta("vae_queue_wait_seconds_count", kernel="encode") == 1
    assert after[("vae_ready", ())] == 1
    assert after[("vae_queue_depth", (("kernel", "encode"),))] == 0
    info = [k for k in after if k[0] == "vae_model_info"]
    assert len(info) == 1 and dict(info[0][1])["device"] == SERVED_DEVICE
    assert ("vae_rejections_total", (("reason", "queue_full"),)) in after


def test_docs_work_offline(client):
    page = client.get("/docs")
    assert page.status_code == 200
    assert "cdn" not in page.text.lower() and "https://" not in page.text.split("<body>")[-1].split("url:")[0]
    bundle = page.text.split('<script src="')[1].split('"')[0]
    assert bundle.startswith("/") and client.get(bundle).status_code == 200
    spec = client.get("/openapi.json").json()
    assert {"/encode", "/decode", "/sample", "/interpolate", "/anomaly-score"} <= set(spec["paths"])


@pytest.mark.parametrize(
    "kwargs, status, code",
    [
        ({"content": b"", "headers": {"content-type": "application/x-npy"}}, 422, "invalid_array"),
        ({"content": b"not an image", "headers": {"content-type": "text/plain"}}, 415, "unsupported_media_type"),
        ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 422, "invalid_input"),
        ({"json": {"images": []}}, 422, "invalid_input"),
        ({"json": {"images": ["!!!"]}}, 422, "invalid_image"),
        ({"files": [("file", ("x.png", b"\x89PNG\r\n\x1a\n garbage", "image/png"))]}, 422, "invalid_image"),
        ({"files": [("file", ("x.png", b"GIF89a", "image/gif"))]}, 422, "invalid_image"),
    ],
)
def test_bad_images_get_a_clear_4xx(client, kwargs, status, code):
    response = client.post("/encode", **kwargs)
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code and response.json()["error"]["message"]


def test_unknown_route_and_method_are_json_errors(client):
    assert client.get("/nope").json()["error"]["code"] == "not_found"
    assert client.get("/encode").status_code == 405


def test_limits_on_bytes_and_rows(settings, digit_images):
    small = variant(settings, max_body_bytes=2048, max_rows=4)
    with TestClient(create_app(small)) as c:
        wait_ready(c)
        big = c.post("/encode", content=b"\0" * 5000, headers={"content-type": "application/x-npy"})
        assert big.status_code == 413 and big.json()["error"]["code"] == "too_large"

        def chunks():  # no Content-Length: the limit must hold while the body streams in
            for _ in range(10):
                yield b"\0" * 1000

        streamed = c.post("/encode", content=chunks(), headers={"content-type": "application/x-npy"})
        assert streamed.status_code == 413
        many = c.post("/encode", files=[("file", (f"{i}.png", png(digit_images[i]), "image/png")) for i in range(5)])
        assert many.status_code == 413
        assert c.post("/encode", files=[("file", ("0.png", png(digit_images[0]), "image/png"))]).status_code == 200


def test_api_key_guards_everything_but_health(settings):
    with TestClient(create_app(variant(settings, api_key="s3cret"))) as c:
        wait_ready(c)
        assert c.post("/sample", json={"n": 1}).status_code == 401
        assert c.post("/sample", json={"n": 1}, headers={"x-api-key": "wrong"}).status_code == 401
        assert c.post("/sample", json={"n": 1}, headers={"x-api-key": "s3cret"}).status_code == 200
        assert c.get("/livez").status_code == 200 and c.get("/metrics").status_code == 401
        c.headers["x-api-key"] = "s3cret"
        samples = metric_samples(c)
        assert samples[("vae_rejections_total", (("reason", "unauthorized"),))] == 3
