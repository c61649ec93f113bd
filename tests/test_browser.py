"""The web page at ``/``, end to end in headless Chromium (Debian's chromium + chromedriver, driven by
Selenium): upload an image and get its caption, drop another image, ask a question, classify with typed
labels, see errors; then a screenshot must show the caption's text.

This test never skips: without Chromium, chromedriver or Selenium it fails and says what to install
(.ci/run installs them).
"""

from __future__ import annotations

import base64
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from PIL import Image
from surfaces_fixtures import one_intraop_thread

import vlkit
from vlkit.serving.app import BackgroundServer
from vlkit.serving.schemas import ServerSettings

CHROME_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1100,800",
)
TIMEOUT_S = 60

# Draws a 48 px blue square on a canvas, drops it on the page as a PNG file and returns its base64.
DROP_SCRIPT = """
const done = arguments[arguments.length - 1];
const canvas = document.createElement("canvas");
canvas.width = 48; canvas.height = 48;
const ctx = canvas.getContext("2d");
ctx.fillStyle = "#ffffff"; ctx.fillRect(0, 0, 48, 48);
ctx.fillStyle = "#0000ff"; ctx.fillRect(10, 10, 28, 28);
canvas.toBlob((blob) => {
  const transfer = new DataTransfer();
  transfer.items.add(new File([blob], "dropped.png", { type: "image/png" }));
  const zone = document.getElementById("drop");
  zone.dispatchEvent(new DragEvent("dragover", { dataTransfer: transfer, bubbles: true, cancelable: true }));
  zone.dispatchEvent(new DragEvent("drop", { dataTransfer: transfer, bubbles: true, cancelable: true }));
  blob.arrayBuffer().then((buffer) => {
    let binary = "";
    for (const byte of new Uint8Array(buffer)) binary += String.fromCharCode(byte);
    done(btoa(binary));
  });
}, "image/png");
"""


def _browser_tools() -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.fail(
            "the browser test needs Chromium and chromedriver on PATH: apt-get install -y chromium chromium-driver "
            f"(found chromium={chromium}, chromedriver={driver})"
        )
    return chromium, driver


@pytest.fixture
def browser(tmp_path):
    chromium, driver_path = _browser_tools()
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError as err:  # pragma: no cover - the test extra installs it
        pytest.fail(f"the browser test needs selenium (pip install -e '.[test]'): {err}")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROME_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tempfile.mkdtemp(dir=tmp_path, prefix='chromium-')}")
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must not look for drivers online
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_script_timeout(TIMEOUT_S)
    try:
        yield driver
    finally:
        driver.quit()


def _ink(png: Path | bytes) -> int:
    """How many pixels of an element screenshot are dark (text), on a light background."""
    import io

    image = Image.open(png if isinstance(png, Path) else io.BytesIO(png)).convert("L")
    return sum(1 for value in image.tobytes() if value < 128)


def test_web_page_captions_answers_and_classifies(browser, tiny_model_dirs, shape_images, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with one_intraop_thread():
        pipe = vlkit.load(tiny_model_dirs["blip2"])
        image = shape_images[0]
        labels = ["red circle", "blue square", "green triangle"]
        expected_caption = pipe.caption(image)
        expected_answer = pipe.answer(image, "what color is the shape?")
        expected_classes = [e["label"] for e in pipe.classify(image, labels)]
        assert expected_caption.strip(), "the fixture model should write a visible caption"

        with BackgroundServer(pipe, ServerSettings()) as server:
            wait = WebDriverWait(browser, TIMEOUT_S)
            text = lambda element_id: browser.find_element(By.ID, element_id).get_attribute("textContent")  # noqa: E731

            browser.get(server.url + "/")
            wait.until(lambda _: "caption" in text("model-tasks"))
            assert text("model-name") == pipe.name

            # Upload: choosing a file captions it right away.
            browser.find_element(By.ID, "file").send_keys(str(image))
            wait.until(lambda _: text("caption") != "")
            assert text("caption") == expected_caption

            # A question about it.
            browser.find_element(By.ID, "question").send_keys("what color is the shape?")
            browser.find_element(By.ID, "ask-btn").click()
            wait.until(lambda _: text("answer") != "")
            assert text("answer") == expected_answer

            # Typed labels.
            browser.find_element(By.ID, "labels").send_keys(", ".join(labels))
            browser.find_element(By.ID, "classify-btn").click()
            wait.until(lambda _: len(browser.find_elements(By.CSS_SELECTOR, "#classes tr")) == len(labels))
            rows = browser.find_elements(By.CSS_SELECTOR, "#classes tr")
            assert [r.find_elements(By.TAG_NAME, "td")[0].text for r in rows] == expected_classes
            assert all(r.find_elements(By.TAG_NAME, "td")[1].text.endswith("%") for r in rows)

            # The server's reasons reach the page.
            browser.find_element(By.ID, "labels").clear()
            browser.find_element(By.ID, "labels").send_keys("dog, dog")
            browser.find_element(By.ID, "classify-btn").click()
            wait.until(lambda _: "distinct" in text("error"))

            # The screenshot shows the caption.
            browser.find_element(By.ID, "labels").clear()
            browser.find_element(By.ID, "labels").send_keys(", ".join(labels))
            browser.find_element(By.ID, "classify-btn").click()
            wait.until(lambda _: len(browser.find_elements(By.CSS_SELECTOR, "#classes tr")) == len(labels))
            wait.until(lambda _: text("status") == "" and text("error") == "")
            shot = tmp_path / "page.png"
            assert browser.save_screenshot(str(shot))
            caption_box = browser.find_element(By.ID, "caption")
            assert caption_box.is_displayed() and caption_box.size["height"] > 0
            assert _ink(caption_box.screenshot_as_png) > 20, "no caption text visible in the screenshot"
            page = Image.open(shot)
            assert page.size[0] >= 1000 and len(set(page.convert("L").tobytes())) > 10
            keep = os.environ.get("VLKIT_SCREENSHOT_DIR")
            if keep:
                shutil.copy(shot, Path(keep) / "vlkit-web-page.png")

            # Drop another image on the page: it is captioned too.
            dropped = base64.b64decode(browser.execute_async_script(DROP_SCRIPT))
            wait.until(lambda _: text("drop-text") == "dropped.png" and text("caption") != "")
            assert text("caption") == pipe.caption(dropped)
            assert text("answer") == "" and not browser.find_elements(By.CSS_SELECTOR, "#classes tr")
