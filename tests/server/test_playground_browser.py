"""The playground in a real headless Chromium (Debian's chromium + chromium-driver, driven by Selenium), against
``sd-endpoint serve`` with the tiny model, keys on and content screening through the local AACS emulator.

`make test` installs the browser (scripts/setup.sh with SD_ENDPOINT_SETUP_BROWSER=1). Without it the test FAILS,
everywhere: the playground must never go untested.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from aacs_emulator import AacsEmulator
from tests.support.servers import LiveServer, model_env

pytestmark = pytest.mark.slow

KEY = "playground-key-2718281828"
AACS_KEY = "playground-aacs-key"
POLICY: dict[str, Any] = {
    "text": {"terms": [{"term": "crashmaul", "category": "Violence", "severity": 4}]},
    "blocklists": {},
    "image": {"rules": []},
}
PROMPT = "a lighthouse at dawn, in Monet's style"  # a single quote: the shown curl must quote it
WAIT_S = 240  # a generation on a loaded 2-core machine; the steps are few and the images tiny


def _browser_or_fail() -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver") if shutil.which("curl") else None  # curl runs the page's command
    try:
        import selenium  # noqa: F401
    except ImportError:
        driver = None
    if chromium and driver:
        return chromium, driver
    # Never a skip: `make test` installs the browser, so a missing one is a broken setup, not a pass.
    pytest.fail(
        "the playground test needs Chromium, chromedriver, curl and selenium: run `make test` (its setup installs "
        "Debian's chromium, chromium-driver and curl, and the [dev] extra)"
    )


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    _browser_or_fail()  # before the minutes of starting a server
    with AacsEmulator(POLICY, key=AACS_KEY) as emulator:
        env = {
            **model_env(tiny_model_dir, cache_dir, keys=KEY, default_height=64, default_width=64, default_steps=2),
            **emulator.env(),
            "CONTENT_SAFETY_RETRIES": "0",
        }
        with LiveServer(env, tmp_path_factory.mktemp("playground") / "server.log", key=KEY).serving() as live:
            yield live


@pytest.fixture
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver_path = _browser_or_fail()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1400"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # The Debian driver, never Selenium Manager (which would try to download one).
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def fill(driver: Any, field: str, value: object) -> None:
    element = driver.find_element("id", field)
    element.clear()
    element.send_keys(str(value))


def generate(driver: Any) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    driver.find_element("id", "generate").click()
    WebDriverWait(driver, WAIT_S).until(lambda d: d.find_element("id", "generate").is_enabled())


def curl_body(driver: Any) -> dict[str, Any]:
    """The JSON body of the curl command the page shows (unquoted as a shell would)."""
    text = driver.find_element("id", "curl").text
    found = re.search(r"-d '(.*)'\s*$", text, re.S)
    assert found, text
    body: dict[str, Any] = json.loads(found.group(1).replace("'\\''", "'"))
    return body


def test_generate_show_images_seeds_blocks_and_errors(browser: Any, server: LiveServer, tmp_path: Path) -> None:
    browser.get(f"{server.url}/playground")
    assert browser.title == "sd-endpoint playground"
    assert browser.find_element("id", "key-box").is_displayed()  # keys are set on this server
    # Input images: not accepted until the contract has the image column; then the inputs are live.
    image_tasks = browser.execute_script("return CONFIG.image_tasks")
    assert browser.find_element("id", "image-note").is_displayed() is (not image_tasks)

    # A key is needed: without it the server's 401 message is shown.
    fill(browser, "prompt", PROMPT)
    for field, value in (("steps", 2), ("width", 64), ("height", 64), ("seed", 123), ("count", 2)):
        fill(browser, field, value)
    generate(browser)
    assert "Error 401: Missing or invalid key" in browser.find_element("id", "error").text

    fill(browser, "key", KEY)
    generate(browser)
    assert not browser.find_element("id", "error").is_displayed()
    images = browser.find_elements("css selector", "#results figure img")
    assert len(images) == 2
    captions = [c.text for c in browser.find_elements("css selector", "#results figcaption")]
    assert captions == ["seed 123", "seed 124"]
    # The browser decoded the PNG ...
    for img in images:
        assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img) == 64
    # ... and so do we, and it is a picture, not a blank.
    src = images[0].get_attribute("src")
    assert src.startswith("data:image/png;base64,")
    pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB"))
    assert pixels.shape == (64, 64, 3) and pixels.std() > 1
    assert "content screening: screened" in browser.find_element("id", "status").text

    screenshot = tmp_path / "playground.png"
    browser.execute_script("window.scrollTo(0, 0)")
    assert browser.save_screenshot(str(screenshot))
    with Image.open(screenshot) as shot:
        assert shot.size[0] >= 1000
    print(f"playground screenshot: {screenshot}")  # noqa: T201  (for a person to look at)

    # The request shown is the contract's own JSON, and pasting it reproduces the image.
    body = curl_body(browser)
    assert body["input_data"]["columns"] == ["prompt"] and body["input_data"]["data"] == [{"prompt": PROMPT}]
    assert body["parameters"] == {
        "num_inference_steps": 2,
        "guidance_scale": 7.5,
        "width": 64,
        "height": 64,
        "seed": 123,
        "num_images_per_prompt": 2,
        "scheduler": "ddim",
    }
    assert "Authorization: Bearer $SD_ENDPOINT_KEY" in browser.find_element("id", "curl").text
    assert KEY not in browser.find_element("id", "curl").text
    # Pasted into a shell as it is (the quote in the prompt included), it gives the same image.
    curl = browser.find_element("id", "curl").text
    run = subprocess.run(
        ["bash", "-c", curl],
        env={**os.environ, "SD_ENDPOINT_KEY": KEY},
        capture_output=True,
        text=True,
        timeout=WAIT_S,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)[0]["generated_image"] == src.split(",", 1)[1]

    # A blocked row is shown with its reason.
    fill(browser, "prompt", "a crashmaul in the harbour")
    fill(browser, "count", 1)
    generate(browser)
    blocked = browser.find_element("css selector", "#results figure.blocked")
    assert "Blocked at the prompt stage: Violence (severity 4)." in blocked.text and "seed 123" in blocked.text
    assert not browser.find_elements("css selector", "#results figure img")

    # Inpainting: an uploaded input image, a mask drawn on it; the contract's image and mask_image columns.
    if image_tasks:
        from selenium.webdriver.common.action_chains import ActionChains
        from selenium.webdriver.support.ui import WebDriverWait

        source = tmp_path / "input.png"
        Image.linear_gradient("L").resize((64, 64)).convert("RGB").save(source)
        browser.find_element("id", "image-file").send_keys(str(source))
        WebDriverWait(browser, 30).until(lambda d: d.find_element("id", "mask-canvas").is_displayed())
        canvas = browser.find_element("id", "mask-canvas")
        # A stroke across the canvas's middle, left to right.
        ActionChains(browser).move_to_element_with_offset(canvas, -60, 0).click_and_hold().move_by_offset(
            120, 0
        ).release().perform()
        fill(browser, "prompt", "a red barn")
        fill(browser, "count", 1)
        generate(browser)
        assert not browser.find_element("id", "error").is_displayed(), browser.find_element("id", "error").text
        sent = curl_body(browser)
        assert sent["input_data"]["columns"] == ["prompt", "image", "mask_image"]
        assert sent["parameters"]["strength"] == 0.8
        (row,) = sent["input_data"]["data"]
        assert base64.b64decode(row["image"]) == source.read_bytes()  # the file itself, untouched
        mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(row["mask_image"]))).convert("L"))
        assert mask.shape == (64, 64) and mask[32, 32] == 255 and mask[2, 2] == 0  # drawn = white = repaint
        (result,) = browser.find_elements("css selector", "#results figure img")
        assert browser.execute_script("return arguments[0].naturalWidth", result) == 64
        assert browser.find_element("css selector", "#results figcaption").text == "seed 123"
        browser.execute_script("window.scrollTo(0, 0)")
        assert browser.save_screenshot(str(tmp_path / "playground-inpaint.png"))
        browser.find_element("id", "image-clear").click()

    # A bad value goes to the server as typed, and the server's message is shown.
    fill(browser, "prompt", "a lighthouse at dawn")
    fill(browser, "steps", 1000)
    generate(browser)
    error = browser.find_element("id", "error")
    assert error.is_displayed()
    assert "Error 400: parameters.num_inference_steps: must be between 1 and 150 (got 1000)" in error.text
    assert not browser.find_elements("css selector", "#results figure")
    browser.execute_script("window.scrollTo(0, 0)")
    assert browser.save_screenshot(str(tmp_path / "playground-error.png"))

    # Nothing was loaded from anywhere but this server, and no script error happened.
    entries = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert all(name.startswith(server.url) for name in entries), entries
    severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE" and "/score" not in e["message"]]
    assert severe == []


def test_page_is_served_without_a_key_and_allows_only_this_server(server: LiveServer) -> None:
    resp = httpx.get(f"{server.url}/playground", timeout=30)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/html")
    csp = resp.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//|@import|url\(""", resp.text)  # no external asset
