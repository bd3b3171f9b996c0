"""The generated report in a real headless Chromium: renders, no console errors, rows and plots present.

Skipped locally when Chromium is not installed; FAILS under CI=true so CI never hides a missing browser.
Screenshots go to the test's tmp dir and, when FEATCACHE_SCREENSHOT_DIR is set, there too.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from test_report import INJECT, write_fake_run, write_fake_sweep

from featcache.report import ReportOptions, build_report

pytestmark = pytest.mark.browser

CHROME_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1400,1000",
)


def _binaries() -> tuple[str, str]:
    chrome = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if not chrome or not driver:
        msg = (
            "chromium and chromedriver are required for the report browser test (apt-get install chromium "
            "chromium-driver)"
        )
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg + "; CI must install them")
        pytest.skip(msg)
    return chrome, driver


@pytest.fixture
def browser():
    chrome, driver_path = _binaries()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="featcache-chrome-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chrome
    for flag in (*CHROME_FLAGS, f"--user-data-dir={profile}"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    drv = webdriver.Chrome(service=Service(driver_path), options=opts)
    drv.set_page_load_timeout(60)
    try:
        yield drv
    finally:
        drv.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _screenshot(drv, tmp_path: Path, name: str) -> Path:
    """Full-page screenshot (window resized to the page height), copied to FEATCACHE_SCREENSHOT_DIR if set."""
    height = drv.execute_script("return document.documentElement.scrollHeight")
    drv.set_window_size(1400, min(int(height) + 40, 12000))
    path = tmp_path / name
    assert drv.save_screenshot(str(path))
    extra = os.environ.get("FEATCACHE_SCREENSHOT_DIR")
    if extra:
        Path(extra).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(extra) / name)
    return path


def test_report_renders_in_chromium(browser, tmp_path):
    runs = tmp_path / "runs"
    ids = write_fake_sweep(runs)
    write_fake_run(
        runs,
        "20240102-000001-logreg-feedface",
        tags=(INJECT,),
        relpath_prefix=INJECT,
        quality=0.5,
        params={"C": 1.0, "note": INJECT},
    )
    res = build_report(runs, tmp_path / "out", ReportOptions(group_by=None))
    browser.get(res.html.resolve().as_uri())
    from selenium.webdriver.common.by import By

    assert "featcache report" in browser.title
    rows = browser.find_elements(By.CSS_SELECTOR, "table.leaderboard tbody tr")
    assert len(rows) == len(ids) + 1
    expected_first = json.loads(res.json.read_text())["runs"][0]["run_id"]
    assert expected_first in rows[0].text and "best" in (rows[0].get_attribute("class") or "")
    images = browser.find_elements(By.CSS_SELECTOR, "figure img")
    assert len(images) >= 4
    for img in images:  # decoded and laid out: a broken data URI has naturalWidth 0
        assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img) > 100
    # the injected tag is shown as text, never turned into an element
    assert INJECT in browser.find_element(By.TAG_NAME, "body").text
    assert browser.execute_script("return document.querySelectorAll('img[onerror]').length") == 0
    logs = browser.get_log("browser")
    errors = [e for e in logs if e.get("level") == "SEVERE"]
    assert errors == [], errors
    shot = _screenshot(browser, tmp_path, "report.png")
    assert shot.stat().st_size > 10_000


def test_validation_only_report_renders(browser, tmp_path):
    runs = tmp_path / "runs"
    write_fake_run(runs, "20240101-000001-mlp-aaaaaaaa", head="mlp", test=False, threshold=None)
    res = build_report(runs, tmp_path / "out")
    browser.get(res.html.resolve().as_uri())
    from selenium.webdriver.common.by import By

    body = browser.find_element(By.TAG_NAME, "body").text
    assert "validation only; the official test split was not used" in body.lower()
    assert [e for e in browser.get_log("browser") if e.get("level") == "SEVERE"] == []
    _screenshot(browser, tmp_path, "report-validation-only.png")
