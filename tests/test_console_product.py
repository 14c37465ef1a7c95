"""The console's product page in a real headless Chromium against a real server that records inspections: reached
from the products table, it shows the versions, the shots as thumbnails, the geometry and scoring, and the trend
chart drawn from the record; removing a shot and rolling back through its buttons change what the server serves,
and deleting the product asks first."""

from __future__ import annotations

import pytest
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

from tests.helpers.browser import assert_loaded_offline, browser, click, open_console, text_of, wait
from tests.helpers.predict import defect, good, png
from tests.helpers.records import ADMIN, CLIENT, recording

__all__ = ["browser"]  # the fixture, imported for pytest
PAGE = "#product-page"


@pytest.fixture(scope="module")
def live(tmp_path_factory, tiny_backbone):
    with recording(tmp_path_factory.mktemp("store"), tiny_backbone) as server:  # widget v1, 4 shots
        # v2: the same shots under another decision rule, so the page has an earlier version to roll back to.
        assert server.http.put("/v1/categories/widget/threshold", json={"target_false_alarm_rate": 0.05},
                               headers=ADMIN).status_code == 200
        server.predict([20, 21, 22, 23])
        files = [("files", (f"d{s}.png", png(defect(s)), "image/png")) for s in (30, 31)]
        assert server.http.post("/v1/categories/widget/predict", files=files, headers=CLIENT).status_code == 200
        server.drain()
        yield server


def served(live, category="widget") -> dict:
    return live.http.get(f"/v1/categories/{category}", headers=ADMIN).json()


def open_page(driver, url: str, category: str = "widget") -> None:
    open_console(driver, url, "admin-key")
    wait(driver, lambda d: d.find_elements("css selector", f'#product-list tr[data-category="{category}"] a.open-page'))
    driver.get_log("browser")  # drain the page's first keyless call (401); from here on no error is expected
    click(driver, f'#product-list tr[data-category="{category}"] a.open-page')  # again if the table re-rendered
    wait(driver, lambda d: d.find_element("css selector", PAGE).is_displayed())
    assert not driver.find_element("tag name", "main").is_displayed()  # a page of its own, not a panel


def shot_cards(driver):
    return driver.find_elements("css selector", "#page-shots .shot")


def version_rows(driver):
    return driver.find_elements("css selector", "#page-versions tr")


def test_page_shows_versions_shots_facts_and_the_trend_chart(browser, live):
    open_page(browser, live.url)
    detail = served(live)
    wait(browser, lambda d: len(version_rows(d)) == len(detail["versions"]) == 2)
    active = browser.find_element("css selector", "#page-versions tr.active")
    assert active.get_attribute("data-version") == str(detail["active_version"]) and "active" in active.text
    assert browser.find_element("css selector", '#page-versions tr[data-version="1"] button.activate').text \
        == "roll back"
    wait(browser, lambda d: len(shot_cards(d)) == detail["shots"] == 4)
    wait(browser, lambda d: all(d.execute_script("return arguments[0].naturalWidth", c.find_element(
        "css selector", "img")) > 0 for c in shot_cards(d)))  # every thumbnail fetched with the key and decoded
    versions = {v["version"]: v for v in detail["versions"]}
    geometry = versions[detail["active_version"]]["geometry"]
    shown = browser.find_element("css selector", '#page-geometry dd[data-field="resize"]').text
    assert shown == geometry["resize"]
    scoring = versions[detail["active_version"]]["scoring"]
    assert browser.find_element("css selector", '#page-scoring dd[data-field="image_score"]').text \
        == scoring["image_score"]
    weighed = versions[detail["active_version"]]["position_baseline"]  # the product's own decision, with its why
    shown = browser.find_element("css selector", '#page-scoring dd[data-field="position_baseline"]').text
    assert shown.startswith(f"{weighed['mode']}: {weighed['chosen']} ("), shown

    trend = live.http.get("/v1/categories/widget/inspections/trend", params={"bucket": "hour"},
                          headers=CLIENT).json()
    with_verdicts = [b for b in trend["buckets"] if b["anomalous_rate"] is not None]
    total = sum(b["inspections"] for b in trend["buckets"])
    assert total == 6  # the fixture's four goods and two defects
    wait(browser, lambda d: len(d.find_elements("css selector", "#page-chart svg.trend g.bars rect.rate-bar"))
         == len(with_verdicts) > 0)
    assert browser.find_elements("css selector", "#page-chart svg.trend line.threshold")
    assert browser.find_elements("css selector", "#page-chart svg.trend line.ref-p95")  # the calibration line
    assert len(browser.find_elements("css selector", "#page-chart circle.dot.p95")) == \
        sum(b["score_p95"] is not None for b in trend["buckets"])
    assert f"{total} inspection(s)" in text_of(browser, "page-chart-note")
    assert_loaded_offline(browser, live.url)


def test_remove_a_shot_then_roll_back_with_the_buttons(browser, live):
    open_page(browser, live.url)
    before = served(live)
    wait(browser, lambda d: len(shot_cards(d)) == before["shots"])
    victim = shot_cards(browser)[0].get_attribute("data-sha256")
    click(browser, f'#page-shots .shot[data-sha256="{victim}"] button.remove')
    wait(browser, lambda d: served(live)["active_version"] == before["active_version"] + 1)
    after = live.http.get("/v1/categories/widget/shots", headers=ADMIN).json()["shots"]
    assert victim not in {s["sha256"] for s in after} and len(after) == before["shots"] - 1
    wait(browser, lambda d: len(shot_cards(d)) == len(after)
         and victim not in {c.get_attribute("data-sha256") for c in shot_cards(d)})
    wait(browser, lambda d: len(version_rows(d)) == len(before["versions"]) + 1)

    click(browser, '#page-versions tr[data-version="1"] button.activate')
    wait(browser, lambda d: served(live)["active_version"] == 1)  # the server serves what the button chose
    wait(browser, lambda d: d.find_element("css selector", "#page-versions tr.active").get_attribute(
        "data-version") == "1")
    wait(browser, lambda d: len(shot_cards(d)) == before["shots"])  # version 1 lists the removed shot again
    assert victim in {c.get_attribute("data-sha256") for c in shot_cards(browser)}
    assert_loaded_offline(browser, live.url)


def test_delete_asks_before_it_deletes(browser, live):
    shots = [("files", (f"g{s}.png", png(good(s)), "image/png")) for s in range(3)]
    assert live.http.post("/v1/categories/spare/shots", files=shots, data={"finetune": "false"},
                          headers=ADMIN).status_code == 201
    open_page(browser, live.url, "spare")
    browser.find_element("id", "page-delete").click()
    WebDriverWait(browser, 10).until(expected_conditions.alert_is_present()).dismiss()
    assert live.http.get("/v1/categories/spare", headers=ADMIN).status_code == 200  # answered "no": kept
    browser.find_element("id", "page-delete").click()
    alert = WebDriverWait(browser, 10).until(expected_conditions.alert_is_present())
    assert "spare" in alert.text and "cannot be undone" in alert.text
    alert.accept()
    wait(browser, lambda d: live.http.get("/v1/categories/spare", headers=ADMIN).status_code == 404)
    wait(browser, lambda d: not d.find_element("css selector", PAGE).is_displayed())
    wait(browser, lambda d: not d.find_elements("css selector", '#product-list tr[data-category="spare"]'))
    assert served(live)["active_version"] is not None  # the other product is untouched
