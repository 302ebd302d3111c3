"""Who gets in, and what leaks: the API key on everything but the two probes (and /metrics only when opened
explicitly), CORS off unless configured, no keys or request bodies in the logs, and a pinned artifact checksum
that stops the CLI with a clear message."""

import base64
import hashlib
import io
import logging
import subprocess
import sys
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from prometheus_client.parser import text_string_to_metric_families

from service.app import create_app
from service.config import Settings
from tests.helpers import wait_ready
from tests.reliability.live_server import REPO

KEY = "k3y-f0r-the-tests-7f2a9c"
# What an orchestrator calls without credentials (the Open Inference Protocol's health routes too).
PROBES = {"/livez", "/readyz", "/v2/health/live", "/v2/health/ready"}
# Served by the app but not listed in its OpenAPI document: the document itself and the Swagger UI.
UNLISTED = {("GET", "/openapi.json"), ("GET", "/docs"), ("GET", "/docs/oauth2-redirect"),
            ("GET", "/static-offline-docs/swagger-ui.css")}


def npy_body(n: int = 1) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.zeros((n, 1, 8, 8), np.uint8), allow_pickle=False)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def keyed(digits_artifact):
    settings = Settings(model_path=digits_artifact, device="cpu", api_key=KEY, max_batch_rows=16, buckets=[4, 16])
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        yield client


def wait_ready(client: TestClient, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, "not ready"
        time.sleep(0.02)


def guarded_operations(client: TestClient):
    """Every (method, path) the app serves but the probes: its OpenAPI document's, read with the key, and the
    unlisted ones."""
    spec = client.get("/openapi.json", headers={"x-api-key": KEY}).json()
    listed = {(method.upper(), path) for path, item in spec["paths"].items() for method in item}
    return sorted({op for op in listed if op[1] not in PROBES} | UNLISTED)


def rejections(client: TestClient) -> float:
    text = client.get("/metrics", headers={"x-api-key": KEY}).text
    return next(s.value for family in text_string_to_metric_families(text) for s in family.samples
                if s.name == "vae_rejections_total" and s.labels == {"reason": "unauthorized"})


@pytest.mark.parametrize("key", [None, "", "wrong", KEY[:-1], KEY + "x", KEY.upper(), b"\xff" * len(KEY)])
def test_everything_but_the_probes_needs_the_key(keyed, key):
    operations = guarded_operations(keyed)
    assert {path for _, path in operations} >= {"/encode", "/decode", "/sample", "/interpolate", "/anomaly-score",
                                                 "/metrics", "/v1/model", "/docs", "/openapi.json"}
    headers = {} if key is None else {"x-api-key": key}
    before = rejections(keyed)
    for method, path in operations + [("GET", "/no-such-path")]:
        response = keyed.request(method, path, content=npy_body(),
                                 headers={**headers, "content-type": "application/x-npy"})
        assert response.status_code == 401, (method, path, response.text)
        error = response.json()["error"]
        if path.startswith("/v2"):  # the Open Inference Protocol's error body: the message alone
            assert error == "missing or wrong X-API-Key"
        else:
            assert error["code"] == "unauthorized"
        assert KEY not in response.text
        assert response.headers["www-authenticate"] == "ApiKey"
    assert rejections(keyed) - before == len(operations) + 1


def test_the_right_key_opens_everything_and_the_probes_need_none(keyed):
    auth = {"x-api-key": KEY}
    assert keyed.post("/encode", content=npy_body(), headers={"content-type": "application/x-npy",
                                                              **auth}).status_code == 200
    assert keyed.post("/sample", json={"n": 1}, headers=auth).status_code == 200
    for method, path in UNLISTED | {("GET", "/metrics"), ("GET", "/v1/model")}:
        assert keyed.request(method, path, headers=auth).status_code == 200, path
    for path in PROBES:
        assert keyed.get(path).status_code == 200, path


def test_metrics_public_opens_metrics_and_nothing_else(digits_artifact):
    settings = Settings(model_path=digits_artifact, device="cpu", api_key=KEY, metrics_public=True,
                        max_batch_rows=16, buckets=[4, 16])
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        assert client.get("/metrics").status_code == 200
        for method, path in guarded_operations(client):
            if path != "/metrics":
                assert client.request(method, path).status_code == 401, path


def test_metrics_public_is_read_from_the_environment(monkeypatch):
    monkeypatch.setenv("VAE_METRICS_PUBLIC", "true")
    assert Settings().metrics_public is True
    monkeypatch.delenv("VAE_METRICS_PUBLIC")
    assert Settings().metrics_public is False


def test_an_empty_api_key_is_never_the_key(digits_artifact):
    """VAE_API_KEY set but empty (an unset variable in a manifest) must not become a key that an empty X-API-Key
    header matches: it is refused at start-up, or it means no key (config.py does the latter)."""
    for empty in ("", "   "):
        try:
            settings = Settings(model_path=digits_artifact, api_key=empty)
        except ValidationError:
            continue
        assert settings.api_key is None, repr(settings.api_key)


def test_no_key_or_body_in_the_logs(digits_artifact, caplog):
    secret_body = base64.b64encode(b"BODY-MARKER-" * 8).decode()
    settings = Settings(model_path=digits_artifact, device="cpu", api_key=KEY, log_level="debug",
                        max_batch_rows=16, buckets=[4, 16])
    with caplog.at_level(logging.DEBUG), TestClient(create_app(settings)) as client:
        wait_ready(client)
        auth = {"x-api-key": KEY}
        client.post("/encode", json={"images": [secret_body]}, headers=auth)  # 422, echoing nothing
        client.post("/encode", json={"images": [secret_body]}, headers={"x-api-key": "WRONG-KEY-MARKER"})
        client.post("/decode", content=b'{"z": [["BODY-MARKER"]]}',
                    headers={**auth, "content-type": "application/json"})
        client.post("/sample", json={"n": 1, "seed": 1, "note": "BODY-MARKER"}, headers=auth)
        client.post("/encode", content=npy_body(), headers={**auth, "content-type": "application/x-npy"})
    server = [r for r in caplog.records if r.name.split(".")[0] in {"service", "uvicorn", "fastapi", "starlette"}]
    assert any(r.name.startswith("service") for r in server)  # the server's own log was captured
    text = "\n".join(r.getMessage() + (str(r.exc_info[1]) if r.exc_info else "") for r in server)
    for marker in (KEY, "WRONG-KEY-MARKER", "BODY-MARKER", secret_body[:16]):
        assert marker not in text, marker


def test_cors_is_off_unless_origins_are_configured(digits_artifact):
    preflight = {"origin": "https://evil.example", "access-control-request-method": "POST"}
    settings = Settings(model_path=digits_artifact, device="cpu", max_batch_rows=16, buckets=[4, 16])
    with TestClient(create_app(settings)) as client:
        response = client.options("/sample", headers=preflight)
        assert "access-control-allow-origin" not in response.headers
        response = client.get("/livez", headers={"origin": "https://evil.example"})
        assert "access-control-allow-origin" not in response.headers
    allowed = Settings(model_path=digits_artifact, device="cpu", cors_origins=["https://app.example"],
                       max_batch_rows=16, buckets=[4, 16])
    with TestClient(create_app(allowed)) as client:
        ok = client.options("/sample", headers={**preflight, "origin": "https://app.example"})
        assert ok.headers.get("access-control-allow-origin") == "https://app.example"
        evil = client.options("/sample", headers=preflight)
        assert evil.headers.get("access-control-allow-origin") != "https://evil.example"
    # A browser's preflight never carries the key: with one set, it must still be answered (by CORS, not 401).
    keyed_cors = Settings(model_path=digits_artifact, device="cpu", cors_origins=["https://app.example"],
                          api_key=KEY, max_batch_rows=16, buckets=[4, 16])
    with TestClient(create_app(keyed_cors)) as client:
        ok = client.options("/sample", headers={**preflight, "origin": "https://app.example"})
        assert ok.status_code == 200 and ok.headers.get("access-control-allow-origin") == "https://app.example"
        assert client.post("/sample", json={"n": 1}, headers={"origin": "https://app.example"}).status_code == 401


def _serve(artifact, env):
    return subprocess.run([sys.executable, "-m", "service", "--model", str(artifact), "--port", "0"],
                          capture_output=True, text=True, timeout=120, cwd=REPO,
                          env={**__import__("os").environ, **env})


def test_the_cli_refuses_an_artifact_that_is_not_the_pinned_one(digits_artifact):
    wrong = _serve(digits_artifact, {"VAE_EXPECTED_SHA256": "0" * 64})
    assert wrong.returncode == 2
    assert "is not the pinned" in wrong.stderr and "Traceback" not in wrong.stderr
    malformed = _serve(digits_artifact, {"VAE_EXPECTED_SHA256": "not-a-sha"})
    assert malformed.returncode == 2 and "64 hex digits" in malformed.stderr
    # ... and serves the pinned one, naming it.
    pinned = hashlib.sha256(digits_artifact.read_bytes()).hexdigest()
    with TestClient(create_app(Settings(model_path=digits_artifact, expected_sha256=pinned.upper()))) as client:
        wait_ready(client)
        assert client.get("/v1/model").json()["sha256"] == pinned
