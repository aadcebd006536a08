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

from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select

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


# --- The playground page (services/sdserve/http/playground), as its tests use it ------------


def by_id(driver, element_id: str):
    return driver.find_element(By.ID, element_id)


def open_page(driver, base_url: str, key: str | None) -> None:
    """Loads the page with `key` already entered in this tab (None: no key), and waits for
    its models."""
    driver.get(base_url)
    driver.execute_script("sessionStorage.clear()")
    if key is not None:
        driver.execute_script("sessionStorage.setItem('sdserve.apiKey', arguments[0])", key)
    driver.get(base_url)
    if key is not None:
        wait_for(lambda: by_id(driver, "model").get_attribute("value"), what="the models")


def fill(driver, **fields) -> None:
    """Types each value into the input of that id (underscores for dashes); model and
    scheduler are chosen from their lists."""
    for name, value in fields.items():
        element = by_id(driver, name.replace("_", "-"))
        if element.tag_name == "select":
            Select(element).select_by_value(str(value))
        else:
            element.clear()
            element.send_keys(str(value))


def cards(driver, where: str = "#gallery") -> list:
    return driver.find_elements(By.CSS_SELECTOR, f"{where} > .card")


def card_png(driver, card) -> bytes:
    return data_url_bytes(card.find_element(By.TAG_NAME, "img").get_attribute("src"))


def generate(driver, timeout_s: float = 60) -> bytes:
    """Clicks Generate and returns the PNG of the new gallery card."""
    before = len(cards(driver))
    by_id(driver, "generate").click()
    wait_for(lambda: len(cards(driver)) > before, timeout_s, what="the final image")
    wait_for(lambda: not by_id(driver, "generate").get_attribute("disabled"), 10)
    return card_png(driver, cards(driver)[0])


def error_beside(driver, param: str) -> str:
    """The error text under the field that `param` (the body's name) stands for."""
    where = by_id(driver, "generate-form").find_element(By.CSS_SELECTOR, f'[data-param="{param}"]')
    return wait_for(lambda: where.text, what=f"the error of {param}")


def paint(driver, canvas, rows: slice, cols: slice, image_size: int) -> None:
    """Strokes over image pixels rows x cols with the mouse, every 4 pixels (brush 8)."""
    # in the middle of the window: clear of the form's sticky Generate bar
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", canvas)
    scale = canvas.size["width"] / image_size
    half = canvas.size["width"] / 2

    def at(pixel: float) -> int:
        return round(pixel * scale - half)  # an offset from the canvas's centre

    for row in range(rows.start + 2, rows.stop - 1, 4):
        ActionChains(driver).move_to_element_with_offset(canvas, at(cols.start + 2), at(row)) \
            .click_and_hold().move_to_element_with_offset(canvas, at(cols.stop - 2), at(row)) \
            .release().perform()  # fmt: skip


def known_jobs(driver) -> set[str]:
    """The ids of the jobs the page listed first (earlier tests' jobs of the same tenant)."""
    wait_for(lambda: by_id(driver, "jobs").get_attribute("data-loaded"), what="the jobs list")
    return {r.get_attribute("data-job-id") for r in job_rows(driver, set())}


def job_rows(driver, known: set[str]) -> list:
    return [r for r in driver.find_elements(By.CSS_SELECTOR, "#jobs .job")
            if r.get_attribute("data-job-id") not in known]  # fmt: skip
