"""Headless Chromium (Debian's chromium + chromium-driver, driven by Selenium) for the console's browser tests:
the module-scoped ``browser`` fixture, polling helpers, and the check that a page loaded nothing from outside
the service. External hosts are unresolvable in the browser, so a page that renders works offline."""

from __future__ import annotations

import contextlib
import os
import shutil

import pytest

WAIT_S = 60  # generous: the shared 2-core CI box also runs the model behind every click


def chromium_paths() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.fixture(scope="module")
def browser():
    paths = chromium_paths()
    if paths is None:
        message = "Chromium + chromedriver not installed (apt-get install chromium chromium-driver)"
        if os.environ.get("CI") == "true":
            pytest.fail(message + ": .ci/run installs them, so CI must have them")
        pytest.skip(message)
    if os.environ.get("CI") == "true":
        from selenium import webdriver  # a dev dependency: CI must have it
    else:
        webdriver = pytest.importorskip("selenium.webdriver")
    options = webdriver.ChromeOptions()
    options.binary_location = paths[0]
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1000", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=paths[1]))
    driver.set_page_load_timeout(WAIT_S)
    yield driver
    driver.quit()


def open_console(driver, base: str, key: str) -> None:
    """Load ``base``/console and connect with ``key``; the caller waits for what it needs to see next."""
    driver.get(base + "/console")
    field = driver.find_element("id", "key")
    field.clear()  # the tab may remember the previous test's key
    field.send_keys(key)
    driver.find_element("id", "connect").click()


def wait(driver, condition, timeout: float = WAIT_S):
    """Poll ``condition``; an element the console re-rendered between find and read (stale) is just polled
    again, as a person would look again, instead of failing the test on a race with the page's refresh."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1,
                         ignored_exceptions=(NoSuchElementException, StaleElementReferenceException)).until(condition)


def click(driver, css: str) -> None:
    """Click the first element matching ``css`` once it exists, again if the page re-rendered it meanwhile."""
    def done(d) -> bool:
        d.find_element("css selector", css).click()
        return True

    wait(driver, done)


def accept_if_asked(driver, timeout: float = 5.0) -> None:
    """Confirm the console's question if one comes (a change the server warns about) within ``timeout``."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    with contextlib.suppress(TimeoutException):
        WebDriverWait(driver, timeout).until(expected_conditions.alert_is_present()).accept()


def text_of(driver, element_id: str) -> str:
    return driver.find_element("id", element_id).text


# ReDoc's "API docs by Redocly" footer always tries this logo and hides it when it fails to load (its
# onError); with every external host unresolvable here, the page rendering anyway is the offline proof.
REDOC_BRANDING = "https://cdn.redoc.ly/redoc/logo-mini.svg"


def assert_loaded_offline(driver, base: str) -> None:
    """Every resource the page fetched came from the service, and the console logged no errors."""
    urls = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    foreign = [u for u in urls if not u.startswith((base, "data:", "blob:")) and u != REDOC_BRANDING]
    assert not foreign, foreign
    errors = [e for e in driver.get_log("browser")
              if e["level"] == "SEVERE" and "favicon" not in e["message"] and REDOC_BRANDING not in e["message"]]
    assert not errors, errors
