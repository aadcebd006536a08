"""Debian's chromium, headless, driven by Selenium for the playground's tests.

Selenium 4's Selenium Manager would download a browser and a driver when it finds none; here
it is given Debian's (`apt-get install chromium chromium-driver`, which `make test` runs
through deploy/install-tools.sh), so nothing is downloaded at test time. A missing browser is
a failure that says how to install it, never a skip.
"""

from __future__ import annotations

import base64
import shutil
import time
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")


def chromium(width: int = 1280, height: int = 1000):
    """A headless chromium WebDriver; the caller quits it."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not path.exists() and not shutil.which(path.name):
            raise AssertionError(f"{path} is missing: `apt-get install -y chromium "
                                 f"chromium-driver` (`make test` installs {package})")  # fmt: skip
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={width},{height}", "--disable-extensions"):  # fmt: skip
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_script_timeout(60)
    return driver


def wait_for(predicate, timeout_s: float = 30.0, every_s: float = 0.05, what: str = ""):
    """Polls `predicate()` until it returns something truthy, which it returns."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what or predicate}")
        time.sleep(every_s)


def data_url_bytes(url: str) -> bytes:
    """The bytes of a `data:...;base64,` URL (an <img> the page made from a PNG)."""
    head, _, payload = url.partition(",")
    assert head.endswith(";base64"), head[:40]
    return base64.b64decode(payload)
