"""The page at / in a real browser: Debian's chromium, headless, driven by Playwright's Python sync API against a
real ``python -m service`` with the session's trained digits model and an API key.

What a person does and sees: the page asks for the key and says so when it is wrong; the model card; a digit
uploaded and shown with its reconstruction, score, p-value and verdict; a seeded sample grid; an interpolation
strip; an edit moved with the keyboard on a slider. Images are checked as decoded <img> elements of the model's
size, scaled up by an integer with crisp pixels, and holding exactly the PNGs the API returns for the same request.
The key travels only as X-API-Key: never in a URL, never in the server's log.

Needs /usr/bin/chromium (``apt-get install chromium``; .ci/run installs it) and the ``playwright`` package (dev
extra). Never ``playwright install``: that downloads browsers. VAE_UI_SCREENSHOT=PATH also saves the screenshot
there (docs/img/ui.png is one).
"""

from __future__ import annotations  # the Playwright types in signatures are not needed at import

import base64
import io
import os
import re
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.helpers import train_artifact
from tests.reliability.live_server import live_server

try:
    from playwright.sync_api import Browser, Page, expect, sync_playwright
except ImportError as exc:  # the default suite collects this module too, and must run without the dev extra
    PLAYWRIGHT_MISSING: ImportError | None = exc
else:
    PLAYWRIGHT_MISSING = None

pytestmark = pytest.mark.slow

CHROMIUM = Path(os.environ.get("VAE_CHROMIUM", "/usr/bin/chromium"))
# Flags that work as root in a container without a GPU, with nothing reached beyond the loopback server.
# Playwright adds --headless and a fresh temporary --user-data-dir per launch itself.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
KEY = "br0wser-t3st-key-5d0c1a"
SIDE, SCALE = 8, 14  # the digits model's image side; app.js scales it to 112 CSS pixels (LARGE) ...
SMALL_SCALE = 8  # ... and to 64 in grids and strips (SMALL)
TIMEOUT_MS = 60_000  # two shared cores: a model request can wait behind other work


@pytest.fixture(scope="module")
def server(digits_artifact, tmp_path_factory):
    with live_server(digits_artifact, tmp_path_factory.mktemp("ui-server"), api_key=KEY, processes=1) as live:
        yield live


@pytest.fixture(scope="module")
def browser():
    if PLAYWRIGHT_MISSING is not None:
        pytest.fail(f"the playwright package is missing (pip install -e '.[dev]'): {PLAYWRIGHT_MISSING}")
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium; .ci/run does), "
                    "or point VAE_CHROMIUM at a Chromium binary")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def api(server):
    with httpx.Client(base_url=server.url, headers={"x-api-key": KEY}, timeout=60.0) as client:
        yield client


@pytest.fixture
def page(browser: Browser, server):
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    page.errors = []  # uncaught script errors: a working page has none
    page.on("pageerror", lambda error: page.errors.append(str(error)))
    page.requests = []
    page.on("request", lambda request: page.requests.append(request))
    expect.set_options(timeout=TIMEOUT_MS)
    yield page
    context.close()


def png_file(path: Path, pixels: np.ndarray) -> Path:
    Image.fromarray(pixels).save(path, format="PNG")
    return path


def src_base64(locator) -> str:
    src = locator.get_attribute("src")
    assert src.startswith("data:image/png;base64,"), src[:40]
    return src.split(",", 1)[1]


def assert_model_pixels(locator, scale: int) -> None:
    """A decoded <img> of the model's size, shown at an integer scale with crisp pixels."""
    expect(locator).to_be_visible()
    facts = locator.evaluate("""img => ({complete: img.complete, w: img.naturalWidth, h: img.naturalHeight,
        cw: img.getBoundingClientRect().width, ch: img.getBoundingClientRect().height,
        rendering: getComputedStyle(img).imageRendering})""")
    assert facts["complete"] and (facts["w"], facts["h"]) == (SIDE, SIDE), facts
    assert (facts["cw"], facts["ch"]) == (SIDE * scale, SIDE * scale), facts
    assert facts["rendering"] == "pixelated", facts
    decoded = Image.open(io.BytesIO(base64.b64decode(src_base64(locator))))
    assert decoded.size == (SIDE, SIDE) and decoded.mode == "L"


def shown_number(text: str, label: str) -> float:
    match = re.search(rf"{label}\s*\n?\s*(-?[0-9.]+(?:e-?[0-9]+)?)", text)
    assert match, (label, text)
    return float(match.group(1))


def test_a_person_sees_the_model_its_reconstructions_scores_samples_interpolations_and_edits(
        server, page: Page, api: httpx.Client, digits_dataset, tmp_path):
    test = digits_dataset.test
    digit = np.round(test.images[0, 0].astype(np.float64) * 255.0 / (digits_dataset.levels - 1)).astype(np.uint8)
    digit_png = png_file(tmp_path / "digit.png", digit)
    noise_png = png_file(tmp_path / "noise.png", np.random.default_rng(0).integers(0, 256, (SIDE, SIDE), np.uint8))
    card = api.get("/v1/model").json()
    directions = api.get("/directions").json()["directions"]
    kind = card["metadata"]["scoring"]["default"]  # what the page scores with unless a person picks another
    assert directions, "the digits artifact has class directions (training.directions)"

    # The key: asked for, refused when wrong with the server's own message, accepted from the keyboard.
    page.goto(server.url + "/")
    expect(page.get_by_role("heading", name="VAE model viewer")).to_be_visible()
    expect(page.locator("#model-status")).to_contain_text("This server needs an API key")
    key = page.get_by_role("textbox", name="API key")
    expect(key).to_be_focused()
    key.fill("not-the-key")
    page.get_by_role("button", name="Use key").click()
    expect(page.locator("#model-status")).to_contain_text("refused this API key")
    expect(page.locator("#model-status")).to_contain_text("missing or wrong X-API-Key")
    key.fill(KEY)
    key.press("Enter")

    # The model card, as /v1/model says it.
    model = page.locator("#model-card")
    expect(model).to_contain_text("digits")
    expect(model).to_contain_text(f"{card['metadata']['calibration']['n']} held-out scores")
    expect(model).to_contain_text(f"{card['metadata']['evaluation']['iw_nll_nats']:.2f}")
    expect(model.locator("dd").nth(2)).to_have_text(re.compile(rf"^{card['latent_dim']} "))
    expect(model).to_contain_text("1 × 8 × 8")

    # Two images: per image its reconstruction (the API's /encode -> /decode of mu, byte for byte) and its score.
    page.get_by_label("Choose images").set_input_files([digit_png, noise_png])
    reconstruction = page.get_by_role("img", name="Reconstruction of digit.png")
    assert_model_pixels(reconstruction, SCALE)
    mu = api.post("/encode", files={"file": ("digit.png", digit_png.read_bytes(), "image/png")}).json()["mu"]
    assert src_base64(reconstruction) == api.post("/decode", json={"z": mu}).json()["images"][0]
    assert_model_pixels(page.get_by_role("img", name="Reconstruction of noise.png"), SCALE)
    expect(page.locator("#images-status")).to_contain_text("2 image(s) reconstructed and scored")
    rows = page.locator("#image-results > li")
    for step, alpha in enumerate((0.01, 0.5, 0.01)):
        if step:  # the level typed in and Enter: scored again, the verdict at the new level
            page.get_by_label("Level α").fill(str(alpha))
            page.get_by_label("Level α").press("Enter")
        for index, path in enumerate((digit_png, noise_png)):
            expected = api.post("/anomaly-score", params={"alpha": alpha},
                                files={"file": (path.name, path.read_bytes(), "image/png")}).json()["scores"][0]
            verdict = ("anomaly" if expected["is_anomaly"] else "normal") + f" at α = {alpha}"
            row = rows.nth(index)
            expect(row.locator(".verdict")).to_have_text(verdict)
            text = row.inner_text()
            assert shown_number(text, re.escape(f"Score ({kind})")) == pytest.approx(expected["score_nats"], abs=0.006)
            assert shown_number(text, "p-value") == pytest.approx(expected["p_value"], rel=0.01, abs=0.0006)
            # The default kind's main term: where the image lands among the training classes.
            assert shown_number(text, "Latent density") == pytest.approx(expected["latent_density_nats"], abs=0.006)
            assert "Latent distance" not in text  # not a term of the default kind

    # Samples: a seed typed in and Enter draws the grid; the same images the API gives for that seed.
    page.get_by_role("spinbutton", name="Images", exact=True).fill("16")
    seed = page.get_by_role("spinbutton", name="Seed")
    seed.fill("7")
    seed.press("Enter")
    grid = page.locator("#sample-grid img")
    expect(grid).to_have_count(16)
    sampled = api.post("/sample", json={"n": 16, "seed": 7, "temperature": 1.0}).json()
    for i in range(16):
        assert_model_pixels(grid.nth(i), SMALL_SCALE)
        assert src_base64(grid.nth(i)) == sampled["images"][i]
    expect(page.get_by_role("img", name="Sample 3 of 16, seed 7, temperature 1.00")).to_be_visible()

    # Keyboard: Tab from the temperature slider reaches "Draw samples", with a visible focus ring; Space presses it.
    page.get_by_role("slider", name="Temperature").focus()
    page.keyboard.press("Tab")
    focused = page.evaluate("() => [document.activeElement.textContent, getComputedStyle(document.activeElement)"
                            ".outlineStyle]")
    assert focused == ["Draw samples", "solid"], focused
    page.keyboard.press("Space")
    expect(page.locator("#samples-status")).to_contain_text("16 samples, seed 7")

    # Interpolation from the uploaded digit to sample 3, linear: the API's frames for the same two ends.
    page.get_by_role("combobox", name="From", exact=True).select_option("image-0")
    page.get_by_role("combobox", name="To", exact=True).select_option("sample-2")
    page.get_by_role("spinbutton", name="Frames").fill("6")
    page.get_by_role("radio", name="linear").check()
    page.get_by_role("button", name="Interpolate").click()
    frames = page.locator("#interp-strip img")
    expect(frames).to_have_count(6)
    strip = api.post("/interpolate", params={"steps": 6, "method": "linear"},
                     json={"z": [mu[0], sampled["z"][2]]}).json()["images"]
    for i in range(6):
        assert_model_pixels(frames.nth(i), SMALL_SCALE)
        assert src_base64(frames.nth(i)) == strip[i]

    # An edit: a direction picked, the slider moved with the arrow keys; the API's edit at that strength.
    name = directions[3]["name"]
    page.get_by_role("combobox", name="Direction").select_option(name)
    expect(page.locator("#edit-description")).to_contain_text(directions[3]["description"])
    page.get_by_role("combobox", name="Image", exact=True).select_option("image-0")
    slider = page.get_by_role("slider", name="Strength")
    slider.focus()
    for _ in range(10):
        slider.press("ArrowRight")
    edited = page.get_by_role("img", name=re.compile(rf"edited along {re.escape(name)} at strength 1\.0$"))
    assert_model_pixels(edited, SCALE)
    expected = api.post("/edit", json={"z": mu, "direction": name, "strengths": [1.0]}).json()
    assert src_base64(edited) == expected["edits"][0]["images"][0]
    page.get_by_role("button", name=re.compile("Show strengths")).click()
    expect(page.locator("#edit-strip-frames img")).to_have_count(7)
    assert_model_pixels(page.locator("#edit-strip-frames img").first, SMALL_SCALE)

    # The key went only as a header: no URL carried it, every call of ours had it, and the server never logged it.
    assert page.requests and not [r.url for r in page.requests if KEY in r.url]
    calls = [r for r in page.requests if r.resource_type == "fetch"]
    assert {re.sub(r"\?.*", "", r.url.removeprefix(server.url)) for r in calls} >= {
        "/v1/model", "/encode", "/decode", "/anomaly-score", "/sample", "/interpolate", "/directions", "/edit"}
    keys = [r.all_headers().get("x-api-key") for r in calls]
    assert keys[0] is None and keys[1] == "not-the-key"  # the first model card asked, then the wrong key
    assert set(keys[2:]) == {KEY}
    assert KEY not in server.log_text()
    assert page.errors == []

    screenshot = tmp_path / "ui.png"
    page.screenshot(path=str(screenshot), full_page=True)
    assert Image.open(screenshot).size[0] == 1200
    if os.environ.get("VAE_UI_SCREENSHOT"):
        shutil.copyfile(screenshot, os.environ["VAE_UI_SCREENSHOT"])


def test_the_page_says_when_editing_is_unavailable(server, page: Page):
    """A server without edit directions answers GET /directions with 404 (older versions have no such route).
    This server has them, so the one answer is replaced in the browser: the only stand-in in this file."""
    page.route("**/directions", lambda route: route.fulfill(
        status=404, content_type="application/json",
        body='{"error": {"code": "not_found", "message": "Not Found"}}'))
    page.goto(server.url + "/")
    page.get_by_role("textbox", name="API key").fill(KEY)
    page.get_by_role("button", name="Use key").click()
    expect(page.locator("#model-card")).to_contain_text("digits")
    expect(page.locator("#edit-status")).to_contain_text("Editing is unavailable")
    expect(page.get_by_role("slider", name="Strength")).to_be_disabled()
    expect(page.get_by_role("combobox", name="Direction")).to_be_disabled()
    assert page.errors == []


def test_dropped_files_a_bad_one_gets_the_servers_message_and_the_rest_still_work(server, page: Page, tmp_path):
    good = png_file(tmp_path / "blank.png", np.zeros((SIDE, SIDE), np.uint8))
    files = [("notes.png", base64.b64encode(b"this is not an image").decode()),
             ("blank.png", base64.b64encode(good.read_bytes()).decode())]
    page.goto(server.url + "/")
    page.get_by_role("textbox", name="API key").fill(KEY)
    page.get_by_role("button", name="Use key").click()
    expect(page.locator("#model-card")).to_contain_text("digits")
    # A drop as the browser delivers one (Playwright's way to drop files): a DataTransfer holding File objects.
    dropped = page.evaluate_handle("""files => {
        const data = new DataTransfer();
        for (const [name, b64] of files) {
            const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
            data.items.add(new File([bytes], name, {type: "image/png"}));
        }
        return data;
    }""", files)
    page.locator("#drop").dispatch_event("drop", {"dataTransfer": dropped})
    alerts = page.locator("#image-results > li").first.get_by_role("alert")
    expect(alerts.first).to_contain_text("(422 invalid_image)")
    assert_model_pixels(page.get_by_role("img", name="Reconstruction of blank.png"), SCALE)
    expect(page.locator("#images-status")).to_contain_text("1 of 2 image(s) failed")
    assert page.errors == []


def test_the_page_says_when_the_model_was_replaced(digits_artifact, browser: Browser, tmp_path_factory):
    """A reload between two actions: the next answer names another model, the page says so and shows its card."""
    models = tmp_path_factory.mktemp("ui-reload")
    shutil.copyfile(digits_artifact, models / "first.ts")
    other = train_artifact(tmp_path_factory, "ui-other", ["--data", "digits", "--device", "cpu", "--epochs", "2",
                                                          "--seed", "5", "--eval-k", "16", "--no-report", "--quiet"])
    shutil.copyfile(other, models / "second.ts")
    with live_server(models / "first.ts", tmp_path_factory.mktemp("ui-reload-server"), api_key=KEY, processes=1,
                     allow_reload="true") as live:
        context = browser.new_context(viewport={"width": 1200, "height": 900})
        context.set_default_timeout(TIMEOUT_MS)
        page = context.new_page()
        errors = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(live.url + "/")
        page.get_by_role("textbox", name="API key").fill(KEY)
        page.get_by_role("button", name="Use key").click()
        first = httpx.get(live.url + "/v1/model", headers={"x-api-key": KEY}).json()["sha256"]
        expect(page.locator("#model-card")).to_contain_text(first[:12])
        expect(page.locator("#model-notice")).to_be_hidden()
        swapped = httpx.post(live.url + "/v1/model/reload", json={"path": "second.ts"}, headers={"x-api-key": KEY},
                             timeout=120).json()
        assert swapped["previous_sha256"] == first and swapped["sha256"] != first
        page.get_by_role("button", name="Draw samples").click()
        notice = page.locator("#model-notice")
        expect(notice).to_be_visible()
        expect(notice).to_contain_text(swapped["sha256"][:12])
        expect(page.locator("#model-card")).to_contain_text(swapped["sha256"][:12])
        assert errors == []
        context.close()
