"""The web page at `/`, in a real headless Chromium (Debian's, driven by Playwright) against a live uvicorn.

The server runs the digits model behind an API key, so every call the page makes carries its Bearer key. The page
types a prompt, picks a cache tier and generates: the images it shows are read back from their data: URLs and
checked with the project's digit classifier. The chart's canvas and the WebSocket stream view are checked from
what they drew and received. A screenshot of the page lands in pytest's tmp_path.
"""

from __future__ import annotations

import base64
import io
import os
import re
import time

import numpy as np
import pytest

CHROMIUM = "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium) for the web page's browser test",
                allow_module_level=True)

sync_api = pytest.importorskip("playwright.sync_api")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from cachekit.pipelines import Runner  # noqa: E402
from cachekit.pipelines.server import ServerThread, create_app  # noqa: E402
from cachekit.zoo.digits_classifier import recognise  # noqa: E402

KEY = "sesame"
WAIT_MS = 30_000
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run"]
SERIES_COLORS = {"images": (0x25, 0x63, 0xEB), "p50": (0xD9, 0x77, 0x06), "p99": (0xDC, 0x26, 0x26)}


@pytest.fixture(scope="module")
def server_url():
    """A live uvicorn on a loopback port over a runner of the digits model, behind an API key; its URL."""
    with Runner(max_batch=8) as runner, ServerThread(create_app(runner=runner, api_key=KEY)) as live:
        yield live.url


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def open_page(browser, url: str):
    """A page in a fresh context (empty localStorage), with its script errors collected in `page.script_errors`."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.script_errors = []
    page.on("pageerror", lambda error: page.script_errors.append(str(error)))
    page.goto(url + "/")
    return page


@pytest.fixture(scope="module")
def page(browser, server_url):
    """The page with the API key typed in, as a user would."""
    page = open_page(browser, server_url)
    page.fill("#api-key", KEY)
    page.press("#api-key", "Tab")  # change: saved, and the server's info is read again with the key
    page.wait_for_function("document.getElementById('model').textContent === 'digits'", timeout=WAIT_MS)
    yield page
    page.context.close()


@pytest.fixture(autouse=True)
def no_script_errors(request):
    yield
    if "page" in request.fixturenames:
        page = request.getfixturevalue("page")
        assert page.script_errors == [], page.script_errors


def decode_data_url(src: str) -> Image.Image:
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix), src[:40]
    return Image.open(io.BytesIO(base64.b64decode(src[len(prefix):]))).convert("RGB")


def as_tensor(images: list[Image.Image]) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.array(image)).permute(2, 0, 1) for image in images])


# ------------------------------------------------------------------------------------------------ the tests
def test_without_the_key_the_page_says_so_readably(browser, server_url):
    page = open_page(browser, server_url)
    try:
        error = page.locator("#error")
        error.wait_for(state="visible", timeout=WAIT_MS)
        assert "401: missing or wrong API key" in error.inner_text()
        page.click("#generate")
        page.wait_for_function("document.getElementById('generate').disabled === false", timeout=WAIT_MS)
        assert re.search(r"^401: missing or wrong API key.*Bearer", error.inner_text())
        assert page.locator("#images .card").count() == 0
        page.fill("#api-key", KEY)
        page.press("#api-key", "Tab")
        page.wait_for_function("document.getElementById('model').textContent === 'digits'", timeout=WAIT_MS)
        assert not error.is_visible()
        assert page.evaluate("localStorage.getItem('cachekit.apiKey')") == KEY
        assert page.script_errors == []
    finally:
        page.context.close()


def test_generate_shows_the_prompted_digits_with_latency_and_reuse(page):
    page.locator("#cache option[value='digits-fastest']").wait_for(state="attached")
    options = [text.split()[0] for text in page.locator("#cache option").all_inner_texts()]
    assert options == ["none", "digits-lossless", "digits-fast", "digits-fastest"]  # slowest, most faithful first
    page.fill("#prompt", "a handwritten 7")
    page.select_option("#cache", "digits-fastest")  # a joint-search point: it runs the 8 steps it was searched at
    assert page.input_value("#steps") == "8" and page.is_disabled("#steps")
    assert "8 steps" in page.locator("#cache option[value='digits-fastest']").inner_text()
    page.select_option("#cache", "digits-fast")
    assert page.input_value("#steps") == "20"
    page.fill("#n", "2")
    page.click("#generate")
    batch = page.locator("#images .batch").first
    batch.locator(".card.done").nth(1).wait_for(timeout=WAIT_MS)
    cards = batch.locator(".card")
    assert cards.count() == 2
    images = [decode_data_url(cards.nth(i).locator("img").get_attribute("src")) for i in range(2)]
    assert all(image.size == (16, 16) for image in images)
    assert recognise(as_tensor(images)).tolist() == [7, 7]
    for i in range(2):
        card = cards.nth(i)
        assert card.get_attribute("data-seed") == str(i)
        latency = card.locator(".latency").inner_text()
        assert re.fullmatch(r"\d+ ms", latency) and int(latency.split()[0]) > 0
        share = float(card.get_attribute("data-reused-share"))
        assert 0.3 < share < 0.8  # digits-fast reuses about half the block outputs
        assert card.locator(".reuse").inner_text() == f"reuse {round(share * 100)}%"
        assert card.locator(".state").inner_text() == "digits-fast"
    shown = page.evaluate("""() => { const img = document.querySelector('#images .card.done img');
        return {rendering: getComputedStyle(img).imageRendering, width: img.getBoundingClientRect().width}; }""")
    assert shown["rendering"] == "pixelated" and shown["width"] >= 64
    assert page.eval_on_selector("#progress", "p => p.value") == 1
    assert page.inner_text("#progress-text") == "2 / 2 images"


def test_cancel_stops_a_generation_on_the_server(page, server_url):
    page.select_option("#cache", "none")  # a shipped schedule fixes the step count; uncached, any count goes
    page.fill("#steps", "100")
    page.fill("#n", "2")
    page.click("#generate")
    batch = page.locator("#images .batch").first
    batch.locator(".card .state", has_text="step ").first.wait_for(timeout=WAIT_MS)
    page.click("#cancel")
    page.wait_for_function("document.getElementById('generate').disabled === false", timeout=WAIT_MS)
    states = batch.locator(".card .state").all_inner_texts()
    assert states == ["cancelled", "cancelled"], states
    assert page.inner_text("#progress-text") == "0 / 2 images, 2 cancelled"
    assert not page.locator("#error").is_visible(), page.inner_text("#error")
    stats = httpx.get(server_url + "/v1/stats", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert stats["active"] == 0 and stats["queued"] == 0 and stats["requests"].get("cancelled", 0) >= 2
    page.fill("#steps", "20")


def test_the_chart_draws_throughput_and_latency_from_stats(page, server_url):
    response = httpx.post(server_url + "/v1/images/generations", headers={"Authorization": f"Bearer {KEY}"},
                          json={"prompt": "a handwritten 1", "num_inference_steps": 6}, timeout=60)
    assert response.status_code == 200, response.text
    before = int(page.get_attribute("#chart", "data-samples") or 0)
    page.wait_for_function(f"+document.getElementById('chart').dataset.samples >= {before + 3}", timeout=WAIT_MS)
    assert re.search(r"p50 \d+ ms · p99 \d+ ms", page.inner_text("#stats-now"))
    counts = page.evaluate("""(colors) => {
        const canvas = document.getElementById('chart');
        const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
        const counts = {drawn: 0};
        for (const name in colors) counts[name] = 0;
        for (let i = 0; i < data.length; i += 4) {
            if (data[i + 3] === 0) continue;
            counts.drawn += 1;
            if (data[i + 3] < 200) continue;
            for (const [name, [r, g, b]] of Object.entries(colors)) {
                if (Math.abs(data[i] - r) + Math.abs(data[i + 1] - g) + Math.abs(data[i + 2] - b) < 60) counts[name] += 1;
            }
        }
        return counts;
    }""", SERIES_COLORS)
    assert counts["drawn"] > 1000, counts  # axes, grid and labels
    for name in ("images", "p50", "p99"):  # a line for each, from the stats it polled
        assert counts[name] >= 5, counts


def test_the_stream_view_sends_drawn_digits_and_shows_the_frames_back(page, tmp_path):
    page.fill("#stream-prompt", "a handwritten 3")
    page.click("#stream-start")
    page.wait_for_function("document.querySelectorAll('#stream-out img[data-loaded]').length >= 4",
                           timeout=WAIT_MS)
    page.click("#stream-stop")
    frames = page.evaluate("""() => [...document.querySelectorAll('#stream-out img[data-loaded]')]
        .map(img => [img.naturalWidth, img.naturalHeight])""")
    assert len(frames) >= 4 and all(size == [16, 16] for size in frames)
    status = page.inner_text("#stream-status")
    sent, received = map(int, re.search(r"sent (\d+) · received (\d+) · stopped", status).groups())
    assert received >= 4 and sent >= received
    drawn = page.evaluate("""() => { const c = document.getElementById('stream-in');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let bright = 0; for (let i = 0; i < d.length; i += 4) bright += d[i] > 128; return bright; }""")
    assert drawn > 10  # a white digit on black went out
    assert not page.locator("#error").is_visible(), page.inner_text("#error")
    assert page.locator("#stream-start").is_enabled() and not page.locator("#stream-stop").is_enabled()
    shot = tmp_path / "page.png"
    page.screenshot(path=str(shot), full_page=True)
    assert Image.open(shot).size[0] == 1280


# ------------------------------------------------------------------------------------------------ a video model
@pytest.fixture(scope="module")
def video_page(browser):
    """The page of a live server over the digits-video model (no API key)."""
    with Runner("digits-video", max_batch=4) as runner, ServerThread(create_app(runner=runner)) as live:
        page = open_page(browser, live.url)
        page.wait_for_function("document.getElementById('model').textContent === 'digits-video'", timeout=WAIT_MS)
        page.runner = runner
        yield page
        page.context.close()


def test_the_page_shows_a_streamed_video_as_its_frames_finish(video_page, tmp_path):
    from cachekit.zoo.digits_video_check import frame_digits

    page = video_page
    assert page.locator("#video-section").is_visible() and not page.locator("#generate-section").is_visible()
    page.fill("#video-prompt", "a handwritten 3 moving left")
    page.click("#video-start")
    page.wait_for_function("document.querySelectorAll('#video-strip img[data-loaded]').length >= 10",
                           timeout=WAIT_MS)
    page.click("#video-stop")
    strip = page.evaluate("""() => { const s = document.getElementById('video-strip');
        return {inOrder: s.dataset.inOrder, received: +s.dataset.received, first: +s.dataset.firstFrameS}; }""")
    assert strip["inOrder"] == "1" and strip["received"] >= 10 and strip["first"] > 0
    status = page.inner_text("#video-status")
    assert re.search(r"first frame after [\d.]+ s · [\d.]+ frames/s · stopped", status), status
    # the oldest frame shown is the stream's first: a real frame showing the prompted digit, not a fill frame
    pixels = page.evaluate("""() => { const imgs = [...document.querySelectorAll('#video-strip img[data-loaded]')];
        const img = imgs[imgs.length - 1]; const c = document.createElement('canvas');
        c.width = img.naturalWidth; c.height = img.naturalHeight; const ctx = c.getContext('2d');
        ctx.drawImage(img, 0, 0); return {alt: img.alt, w: c.width,
                                         data: Array.from(ctx.getImageData(0, 0, c.width, c.height).data)}; }""")
    assert pixels["alt"] == "frame 0" and pixels["w"] == 32
    rgba = np.array(pixels["data"], dtype=np.uint8).reshape(32, 32, 4)
    assert int(frame_digits(torch.from_numpy(rgba[..., :3].copy()).permute(2, 0, 1)[None])[0]) == 3
    assert not page.locator("#error").is_visible(), page.inner_text("#error")
    assert page.locator("#video-start").is_enabled() and not page.locator("#video-stop").is_enabled()
    deadline = time.monotonic() + 30  # Stop closed the socket: the stream's state is freed
    while page.runner.stats()["streams"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert page.runner.stats()["streams"] == 0 and page.runner.stats()["cached_bytes"] == 0
    page.screenshot(path=str(tmp_path / "video-page.png"), full_page=True)
    assert page.script_errors == []
