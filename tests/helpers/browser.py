"""A real headless Chromium driven by Selenium, for the web page's tests.

Uses Debian's ``chromium`` and ``chromium-driver`` (installed with apt-get when running as
root and they are missing); skips with the reason when they cannot be had. Each browser
gets a fresh profile, no background networking, and records its console and network
(Chromium's NetLog) so a test can say what the page did. Screenshots go
to ``test-artifacts/`` at the top of the tree (``GRACE_TEST_ARTIFACTS`` to move it).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.helpers.locks import apt_install

ROOT = Path(__file__).resolve().parent.parent.parent
ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run",
        "--disable-default-apps", "--disable-extensions", "--window-size=1400,1000"]
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


def _found() -> tuple[str, str] | None:
    chromium = shutil.which("chromium")
    driver = shutil.which("chromedriver")
    return (chromium, driver) if chromium and driver else None


def ensure_chromium() -> tuple[str, str]:
    """Paths of chromium and chromedriver, installing Debian's packages if root; else skip."""
    found = _found()
    if found is None:
        apt_install(["chromium", "chromium-driver"], lambda: _found() is not None)
        found = _found()
    if found is None:
        pytest.skip("Chromium is not installed (Debian's chromium and chromium-driver) and "
                    "cannot be installed here (needs root and apt-get)")
    try:
        import selenium  # noqa: F401
    except ImportError:
        pytest.skip("selenium is not installed (pip install -e '.[test]')")
    return found


def artifacts_dir() -> Path:
    path = Path(os.environ.get("GRACE_TEST_ARTIFACTS") or ROOT / "test-artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


class Browser:
    """One Chromium with a fresh profile; ``driver`` is Selenium's WebDriver."""

    def __init__(self, driver: Any, profile: str) -> None:
        self.driver = driver
        self.profile = profile
        self.netlog = Path(profile) / "netlog.json"

    def js(self, script: str, *args: Any) -> Any:
        return self.driver.execute_script(script, *args)

    def wait(self, pred: Callable[[], Any], timeout: float, what: str) -> Any:
        """Wait until ``pred()`` is truthy. The page raises no event a test can block on,
        so the DOM is polled (each read is a real round trip to the browser)."""
        deadline = time.monotonic() + timeout
        while True:
            got = pred()
            if got:
                return got
            if time.monotonic() > deadline:
                self.screenshot(f"timeout-{what[:40].replace(' ', '_')}")
                raise AssertionError(f"{what}: not within {timeout} s; banner: "
                                     f"{self.text('banner')!r}")
            time.sleep(0.02)

    def text(self, element_id: str) -> str:
        return str(self.js(f"const e = document.getElementById({json.dumps(element_id)});"
                           "return e ? e.textContent : ''"))

    def screenshot(self, name: str) -> Path:
        path = artifacts_dir() / f"{name}.png"
        self.driver.save_screenshot(str(path))
        return path

    def console_errors(self) -> list[dict[str, Any]]:
        return [e for e in self.driver.get_log("browser") if e.get("level") == "SEVERE"]

    def finish(self) -> list[tuple[str | None, str]]:
        """Quit the browser; every request it started, as (initiator, URL), from its
        NetLog (written whole at exit). It covers the page, its Worker (which the page's
        DevTools log does not) and the browser's own background traffic."""
        if self.driver is not None:
            self.driver.quit()
            self.driver = None
        data = json.loads(self.netlog.read_text())
        types = {v: k for k, v in data["constants"]["logEventTypes"].items()}
        return [(ev["params"].get("initiator"), ev["params"]["url"]) for ev in data["events"]
                if types.get(ev["type"]) == "URL_REQUEST_START_JOB"
                and "url" in (ev.get("params") or {})]

    @staticmethod
    def leaving(requests: list[tuple[str | None, str]], origin: str) -> list[str]:
        """The URLs the page at ``origin`` (or its Worker) asked for off this machine."""
        return [url for initiator, url in requests
                if initiator == origin and urlsplit(url).hostname not in LOCAL_HOSTS]


@contextmanager
def chromium() -> Iterator[Browser]:
    binary, driver_path = ensure_chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="gchrome")
    options = webdriver.ChromeOptions()
    for arg in [*ARGS, f"--user-data-dir={profile}"]:
        options.add_argument(arg)
    options.binary_location = binary
    options.add_argument(f"--log-net-log={profile}/netlog.json")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    browser = Browser(driver, profile)
    try:
        yield browser
    finally:
        if browser.driver is not None:
            browser.driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
