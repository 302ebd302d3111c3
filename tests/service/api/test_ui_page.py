"""The page at /: served from the package with a strict Content-Security-Policy, open without the API key while
everything else stays closed, gone with VAE_UI=false, and calling only endpoints the server has.

These need no model (no lifespan runs): what a browser does with the page is tests/reliability/test_ui_browser.py.
"""

import fnmatch
import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.config import Settings
from service.api.routes import ui

REPO = Path(__file__).resolve().parents[3]
KEY = "ui-t3st-key-9c1e"
FILES = {"/": "text/html", "/ui/app.js": "text/javascript", "/ui/style.css": "text/css"}


def app_client(**settings) -> TestClient:
    # Not entered as a context manager: no lifespan, no model; the page and the key check need neither.
    return TestClient(create_app(Settings(model_path=REPO / "no-model.ts", **settings)))


@pytest.mark.parametrize("api_key", [None, KEY])
def test_the_page_and_its_two_files_are_served_without_a_key(api_key):
    client = app_client(api_key=api_key)
    for path, media_type in FILES.items():
        response = client.get(path)
        assert response.status_code == 200, (path, response.text)
        assert response.headers["content-type"].startswith(media_type)
        policy = response.headers["content-security-policy"]
        assert "script-src 'self'" in policy and "connect-src 'self'" in policy and "default-src 'none'" in policy
        assert "frame-ancestors 'none'" in policy and "unsafe-inline" not in policy
        assert response.headers["x-content-type-options"] == "nosniff"
    page = client.get("/").text
    assert 'src="ui/app.js"' in page and 'href="ui/style.css"' in page


def test_only_the_page_is_opened_by_the_key_exemption():
    client = app_client(api_key=KEY)
    for path in ("/ui", "/ui/", "/ui/index.html", "/ui/other.js", "/index.html", "/ui/app.js/x", "/v1/model",
                 "/directions", "/openapi.json", "/docs"):
        response = client.get(path)
        assert response.status_code == 401, (path, response.status_code)
    assert client.post("/sample", json={"n": 1}).status_code == 401
    assert set(ui.ASSETS) == set(FILES)


def test_vae_ui_false_serves_no_page_and_opens_nothing(monkeypatch):
    monkeypatch.setenv("VAE_UI", "false")
    assert Settings().ui is False
    monkeypatch.delenv("VAE_UI")
    assert Settings().ui is True  # on by default
    for path in FILES:
        assert app_client(ui=False).get(path).status_code == 404, path
        keyed = app_client(ui=False, api_key=KEY)
        assert keyed.get(path).status_code == 401, path  # closed again like any other path
        assert keyed.get(path, headers={"x-api-key": KEY}).status_code == 404, path


def test_the_page_loads_nothing_from_elsewhere_and_parses_no_html_from_data():
    client = app_client()
    texts = {path: client.get(path).text for path in FILES}
    for path, text in texts.items():
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", text, re.I), f"{path} refers to another site"
        assert "innerHTML" not in text and "insertAdjacentHTML" not in text and "document.write" not in text, path
    assert "<script>" not in texts["/"] and "style=" not in texts["/"]  # the policy would block inline code
    assert "pixelated" in texts["/ui/style.css"]


def test_the_page_calls_only_endpoints_the_server_has():
    client = app_client()
    paths = client.get("/openapi.json").json()["paths"]
    served = {(method.upper(), path) for path, item in paths.items() for method in item}
    script = client.get("/ui/app.js").text
    calls = re.findall(r'\bapi\("([^"]+)"(?:, \{ method: "(\w+)")?', script)
    assert {path for path, _ in calls} >= {"v1/model", "encode", "decode", "anomaly-score", "sample",
                                           "interpolate", "directions", "edit"}
    for path, method in calls:
        assert (method or "GET", "/" + path) in served, (method, path)
    # The key travels as a header only: the script never puts it into a URL or a query.
    assert script.count('"X-API-Key"') == 1 and "api_key=" not in script.lower()


def test_the_files_are_package_data_of_the_wheel():
    """pyproject ships every file of service/api/ui/ (an editable install would serve them even if it did not)."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    patterns = package_data["service.api"]
    names = sorted(path.name for path in (REPO / "service" / "api" / "ui").iterdir())
    assert names == ["app.js", "index.html", "style.css"]
    for name in names:
        assert any(fnmatch.fnmatch(f"ui/{name}", pattern) for pattern in patterns), name
