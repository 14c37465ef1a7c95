"""The console's History in a real headless Chromium against a real server that records with thumbnails:
recent inspections with their kept pictures, filters, "load more" through the cursor, and one-click feedback
that sends the kept image back; rows without a kept image offer no feedback and say why."""

from __future__ import annotations

import pytest

from tests.helpers.browser import assert_loaded_offline, browser, open_console, text_of, wait
from tests.helpers.records import recording

__all__ = ["browser"]  # the fixture, imported for pytest
PAGE = 24  # history.js's HISTORY_PAGE
OLD_ROWS = 25  # with the 2 live rows: more than one page, so "load more" must fetch the rest


@pytest.fixture(scope="module")
def live(tmp_path_factory, tiny_backbone):
    with recording(tmp_path_factory.mktemp("store"), tiny_backbone, record_mode="thumbnails") as server:
        server.records.inspections.insert([  # older rows recorded without images (as in verdicts mode)
            {"time": f"2024-05-01T00:00:{i:02d}.000000Z", "category": "widget", "version": 1, "score": 0.01 * i,
             "score_normalized": None, "verdict": "anomalous" if i % 5 == 0 else "normal", "threshold": 0.5,
             "map_threshold": 0.5, "request_id": None, "part_id": f"old-{i}", "line": "L1", "camera": None,
             "filename": None, "sha256": f"{i:064x}", "image_path": None, "overlay_path": None, "image_bytes": 0,
             "replica": "test"} for i in range(OLD_ROWS)])
        server.predict([11, 12], data={"part_id": "P-7"})
        server.drain()
        yield server


def open_history(driver, url: str, verdict: str = "") -> None:
    open_console(driver, url, "admin-key")
    wait(driver, lambda d: d.find_elements("css selector", "#hist-category option[value='widget']"))
    driver.get_log("browser")  # drain the page's first keyless call (401); from here on no error is expected
    driver.find_element("css selector", f"#hist-verdict option[value='{verdict}']").click()
    driver.find_element("id", "hist-show").click()


def cards(driver):
    return driver.find_elements("css selector", "#history .inspection")


def test_history_pages_thumbnails_and_feedback(browser, live):
    open_history(browser, live.url)
    wait(browser, lambda d: len(cards(d)) == PAGE)
    newest = cards(browser)[:2]
    assert all("P-7" in c.find_element("css selector", ".origin").text for c in newest)
    wait(browser, lambda d: all(d.execute_script("return arguments[0].naturalWidth", c.find_element(
        "css selector", "img")) > 0 for c in newest))  # the kept thumbnails, fetched with the key
    old = cards(browser)[2]
    button = old.find_element("css selector", ".mark-good")
    assert not button.is_enabled() and "kept no image" in button.get_attribute("title")
    browser.find_element("id", "hist-more").click()
    wait(browser, lambda d: len(cards(d)) == OLD_ROWS + 2)
    assert not browser.find_element("id", "hist-more").is_displayed()  # the last page
    ids = [c.get_attribute("data-id") for c in cards(browser)]
    assert len(set(ids)) == len(ids)  # no row twice across the pages
    assert_loaded_offline(browser, live.url)

    newest[0].find_element("css selector", ".mark-good").click()
    wait(browser, lambda d: "saved as version 2" in newest[0].find_element("css selector", ".feedback-result").text)
    shots = live.http.get("/v1/categories/widget/shots", headers={"Authorization": "Bearer admin-key"}).json()
    assert sum(s["source"] == "feedback" for s in shots["shots"]) == 1  # the kept image became a good shot


def test_history_shows_confidence_and_lists_unsure_verdicts(browser, live):
    open_history(browser, live.url)
    browser.find_element("id", "hist-unsure").click()
    browser.find_element("id", "hist-show").click()
    unsure = live.inspections(min_p_value=0.05, limit=100).json()["inspections"]  # history.js's UNSURE_P
    assert unsure, "the live predictions have p-values of at least 1/(4+1): unsure by construction"
    wait(browser, lambda d: len(cards(d)) == len(unsure))
    for card, row in zip(cards(browser), unsure, strict=True):
        assert float(card.get_attribute("data-p-value")) == pytest.approx(row["p_value"])
        assert card.find_element("css selector", ".sure").text.startswith("unsure (p ")
    browser.find_element("id", "hist-unsure").click()  # leave the form as the other tests expect it


def test_history_filters_by_verdict(browser, live):
    open_history(browser, live.url, verdict="anomalous")
    expected = len(live.inspections(verdict="anomalous", limit=100).json()["inspections"])
    assert expected >= OLD_ROWS // 5  # every fifth old row is anomalous
    wait(browser, lambda d: len(cards(d)) == expected and f"{expected} inspection(s)" in text_of(d, "hist-note"))
    assert {c.get_attribute("data-verdict") for c in cards(browser)} == {"anomalous"}
