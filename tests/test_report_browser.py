"""Open the HTML report in a real headless Chromium: every image loads, the console stays clean.

Needs the Debian packages chromium and chromium-driver (.ci/run installs them) and the
`selenium` package (the test extra); skipped where any of them is missing. Selenium is given
the binaries' paths, so it never tries to download a browser or a driver.
"""

from __future__ import annotations

import base64
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from report_fixtures import ReportRun

from cifarlab.diagnosis import diagnose
from cifarlab.report import write_report

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-quic",
                  "--disable-dev-shm-usage",  # containers often have a tiny /dev/shm
                  "--window-size=1400,1000"]


def find_binary(name: str) -> str:
    path = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").is_file() else None)
    if path is None:
        pytest.skip(f"{name} is not installed (apt-get install chromium chromium-driver)")
    return path


@pytest.fixture
def browser(tmp_path: Path):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[test]')")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = find_binary("chromium")
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={tmp_path / 'chromium-profile'}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # to read the console
    driver = webdriver.Chrome(options=options, service=Service(executable_path=find_binary("chromedriver")))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def full_page_png(driver) -> bytes:
    """The whole page, not just the window (the DevTools protocol can capture beyond it)."""
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
    return base64.b64decode(shot["data"])


def test_report_renders_in_chromium(report_run: ReportRun, browser, tmp_path: Path) -> None:
    broken = report_run.broken
    diagnosis = diagnose(predictions=broken / "probs.npy", labels=broken / "labels.npy")
    report = write_report(tmp_path / "report.html", evaluations=[report_run.correct, broken],
                          diagnosis=diagnosis, history=report_run.model_path.parent / "history.csv")

    browser.get(report.as_uri())
    images = browser.execute_script(
        "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth]);")
    assert len(images) == report.read_text().count("<img") > 10
    broken_images = [alt for alt, complete, width in images if not (complete and width > 0)]
    assert not broken_images, f"images that did not load: {broken_images}"
    errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert not errors, f"console errors: {errors}"
    assert browser.title.startswith("cifarlab report")

    screenshot = tmp_path / "report.png"
    screenshot.write_bytes(full_page_png(browser))
    with Image.open(screenshot) as picture:
        assert picture.format == "PNG"
        pixels = np.asarray(picture.convert("L"), dtype=np.float64)
    height = browser.execute_script("return document.documentElement.scrollHeight;")
    # The whole page (several screens), give or take the scrollbar and margins.
    assert pixels.shape[0] > 0.9 * height > 3000 and pixels.shape[1] > 1000
    assert pixels.std() > 20  # not blank: text and figures on white
    assert (pixels < 128).mean() > 0.01
