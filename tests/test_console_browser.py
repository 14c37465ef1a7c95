"""The console and the API docs in a real headless Chromium (Debian's chromium + chromium-driver, driven by
Selenium) against a real server on loopback: register by uploading photos, follow the fine-tune, try images
and see the verdict and overlay; /docs and /redoc render. External hosts are unresolvable in the browser
and every resource a page loaded must come from the service: the pages work offline."""

from __future__ import annotations

import base64

import pytest
from threaded_server import threaded_server

from app.client import Client
from app.core.config import Settings
from tests.helpers.browser import accept_if_asked, assert_loaded_offline, browser, click, text_of, wait
from tests.helpers.predict import defect, good, png

__all__ = ["browser"]  # the fixture, imported for pytest

ADMIN_KEY = "console-admin-key"


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_backbone):
    settings = Settings(_env_file=None, backbone="test:tiny-clip", device="cpu",
                        store=tmp_path_factory.mktemp("store"), admin_keys=[ADMIN_KEY], client_keys=[],
                        finetune_steps=2, finetune_seconds=60)
    with threaded_server(settings, tiny_backbone) as url:
        yield url


def test_console_registers_a_product_and_shows_verdicts(browser, server, tmp_path):
    shots = []
    for seed in range(4):
        path = tmp_path / f"good{seed}.png"
        path.write_bytes(png(good(seed)))
        shots.append(str(path))
    trials = {"ok.png": good(40), "broken.png": defect(41)}
    for name, image in trials.items():
        (tmp_path / name).write_bytes(png(image))

    browser.get(server + "/console")
    wait(browser, lambda d: "Missing or malformed credentials" in text_of(d, "message"))  # it asks for a key
    browser.find_element("id", "key").send_keys("wrong-key")
    browser.find_element("id", "connect").click()
    wait(browser, lambda d: "Invalid API key" in text_of(d, "message"))  # the page uses the service's keys
    browser.get_log("browser")  # drain: that 401 was the point; from here on no error is expected

    key = browser.find_element("id", "key")
    key.clear()
    key.send_keys(ADMIN_KEY)
    browser.find_element("id", "connect").click()
    wait(browser, lambda d: text_of(d, "status") == "connected")

    browser.find_element("id", "reg-category").send_keys("widget")
    browser.find_element("id", "reg-files").send_keys("\n".join(shots))
    browser.find_element("id", "reg-submit").click()
    wait(browser, lambda d: "version 1 serves now" in text_of(d, "reg-result"))
    # The fine-tune job's progress is followed to its end (2 steps here).
    wait(browser, lambda d: text_of(d, "job-state").startswith(("succeeded", "failed")))
    assert text_of(browser, "job-state").startswith("succeeded")
    assert browser.find_element("id", "job-progress").get_attribute("value") == "1"
    row = wait(browser, lambda d: d.find_elements("css selector", '#product-list tr[data-category="widget"]'))[0]
    assert row.find_elements("tag name", "td")[2].text == "4"  # shots column

    browser.find_element("id", "try-files").send_keys("\n".join(str(tmp_path / n) for n in trials))
    cards = wait(browser, lambda d: len(d.find_elements("css selector", "#results .result")) == 2
                 and d.find_elements("css selector", "#results .result"))
    with Client(server, ADMIN_KEY) as client:  # the same images through the API: the page must agree
        truth = {p.filename: p for p in client.predict("widget", [tmp_path / n for n in trials]).predictions}
    for card in cards:
        name = card.find_element("css selector", ".file").text
        expected = "anomalous" if truth[name].is_anomalous else "normal"
        assert card.get_attribute("data-verdict") == expected
        assert card.find_element("css selector", ".verdict").text == expected.upper()
        correction = "False alarm" if expected == "anomalous" else "Missed defect"
        assert correction in card.find_element("css selector", ".feedback").text
        assert float(card.find_element("css selector", ".score").text) == pytest.approx(truth[name].score, abs=1e-3)
        width = browser.execute_script("return arguments[0].naturalWidth", card.find_element("css selector", "img"))
        assert width == 64  # the overlay decoded, at the upload's size (the test images are 64 px)
    # Dropping a photo on the zone (a real DragEvent carrying a File) scores it like choosing it does.
    dropped = base64.b64encode(png(defect(42))).decode()
    browser.execute_script("""
        const bytes = Uint8Array.from(atob(arguments[0]), (c) => c.charCodeAt(0));
        const data = new DataTransfer();
        data.items.add(new File([bytes], "dropped.png", {type: "image/png"}));
        document.getElementById("try-drop").dispatchEvent(new DragEvent("drop", {dataTransfer: data, bubbles: true}));
    """, dropped)
    wait(browser, lambda d: any(c.text == "dropped.png" for c in d.find_elements("css selector", "#results .file")))

    threshold = next(iter(truth.values())).threshold
    row = browser.find_element("css selector", '#product-list tr[data-category="widget"]')
    assert row.find_elements("tag name", "td")[3].text == f"{threshold:.4f}"  # the serving version's threshold
    assert_loaded_offline(browser, server)

    # Feedback: with the decision routes it records the part; without them the page says so in one line.
    has_feedback = "/v1/categories/{category}/feedback" in browser.execute_script(
        "return fetch('/openapi.json').then(r => r.json()).then(s => Object.keys(s.paths))")
    cards[0].find_element("css selector", ".mark-defect").click()
    if has_feedback:
        wait(browser, lambda d: "saved as version" in cards[0].find_element("css selector", ".feedback-result").text)
    else:
        wait(browser, lambda d: "does not offer that yet" in text_of(d, "message"))


def test_threshold_form(browser, server):
    """Extends the console test: a threshold set in the console's form is shown."""
    with Client(server, ADMIN_KEY) as client:
        client.category("widget")  # registered by the test above
    browser.get(server + "/console")
    click(browser, '#product-list tr[data-category="widget"]')
    browser.find_element("css selector", "#thr-mode option[value='threshold']").click()
    browser.find_element("id", "thr-value").send_keys("0.5")
    browser.find_element("id", "thr-submit").click()
    accept_if_asked(browser)  # 0.5 is above the tiny model's scores: the console asks before switching it off
    wait(browser, lambda d: d.find_element("css selector", "#decision dd[data-field='threshold']").text == "0.5000")
    assert browser.find_element("css selector", "#decision dd[data-field='policy']").text == "manual"
    browser.find_element("css selector", "#thr-mode option[value='policy']").click()
    browser.find_element("id", "thr-submit").click()  # back to the automatic rule
    accept_if_asked(browser)  # a random tiny model catches no synthetic defect even at its automatic threshold
    wait(browser, lambda d: d.find_element("css selector", "#decision dd[data-field='policy']").text == "auto")


def test_a_threshold_that_stops_inspecting_is_applied_only_after_the_operator_confirms(browser, server):
    """The server says the rule switches detection off (dry run); the console asks, and a "no" changes nothing."""
    from selenium.webdriver.support import expected_conditions

    with Client(server, ADMIN_KEY) as client:
        before = client.category("widget").active_version
    browser.get(server + "/console")
    click(browser, '#product-list tr[data-category="widget"]')
    browser.find_element("css selector", "#thr-mode option[value='threshold']").click()
    browser.find_element("id", "thr-value").send_keys("1000000")  # above every score: recall 0
    browser.find_element("id", "thr-submit").click()
    alert = wait(browser, expected_conditions.alert_is_present())
    assert "detection is effectively off" in alert.text
    alert.dismiss()
    wait(browser, lambda d: "Threshold not changed" in text_of(d, "message"))
    with Client(server, ADMIN_KEY) as client:
        assert client.category("widget").active_version == before  # the preview wrote nothing
    browser.find_element("id", "thr-submit").click()
    wait(browser, expected_conditions.alert_is_present()).accept()
    wait(browser, lambda d: f"version {before + 1}" in text_of(d, "message"))
    with Client(server, ADMIN_KEY) as client:
        client.set_threshold("widget", auto=True)  # leave the product as the next tests expect it


@pytest.mark.parametrize(("page", "rendered"), [
    ("/docs", ".opblock-summary-path"),  # Swagger UI drew the operations
    ("/redoc", "[data-section-id^='tag/']"),  # ReDoc drew the tag sections
])
def test_api_docs_render_offline(browser, server, page, rendered):
    browser.get_log("browser")  # drain what earlier pages logged
    browser.get(server + page)
    wait(browser, lambda d: len(d.find_elements("css selector", rendered)) > 3)
    assert_loaded_offline(browser, server)
