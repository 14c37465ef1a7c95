"""The console's threshold histogram in a real headless Chromium against a real server that records verdicts:
the line is dragged with the mouse (Selenium ActionChains), the live shares follow it in the right direction and
equal what the served scores give at the line, Preview shows the server's warnings, and Apply asks first, then
changes the active version and threshold on the server."""

from __future__ import annotations

import pytest

from tests.helpers.browser import assert_loaded_offline, browser, open_console, text_of, wait
from tests.helpers.predict import defect, good, png
from tests.helpers.records import ADMIN, recording

__all__ = ["browser"]  # the fixture, imported for pytest
LIVE = "#thv-live dd"  # candidate threshold, good evidence above, defect evidence above, recorded flagged


@pytest.fixture(scope="module")
def live(tmp_path_factory, tiny_backbone):
    with recording(tmp_path_factory.mktemp("store"), tiny_backbone) as server:
        images = [good(s) for s in range(20, 26)] + [defect(s) for s in range(30, 34)]
        server.http.post("/v1/categories/widget/predict", headers={"Authorization": "Bearer client-key"},
                         files=[("files", (f"p{i}.png", png(im), "image/png")) for i, im in enumerate(images)])
        server.drain()
        yield server


def shares(driver) -> tuple[float, float, float, float]:
    """(candidate threshold, false alarms, recall, recorded flagged) as the view computed them."""
    values = [e.get_attribute("data-value") for e in driver.find_elements("css selector", LIVE)]
    return tuple(float(v) for v in values)  # type: ignore[return-value]


def expected(scores: dict, t: float) -> tuple[float, float, float]:
    """The same shares from the served scores: the view must count exactly these."""
    def above(xs):
        return sum(x > t for x in xs) / len(xs)

    defects = scores["confirmed_defects"] or scores["synthetic_defects"]
    return above(scores["normal"] + scores["confirmed_goods"]), above(defects), above(scores["recorded"])


def drag_to(driver, fraction: float) -> None:
    """Press on the line's handle, move to ``fraction`` of the chart's width (0 = left edge), release."""
    from selenium.webdriver.common.action_chains import ActionChains

    handle = driver.find_element("id", "thv-handle")
    box = driver.execute_script("const r = arguments[0].getBoundingClientRect(), h = arguments[1]"
                                ".getBoundingClientRect(); return [r.left, r.width, h.left + h.width / 2];",
                                driver.find_element("id", "thv-chart"), handle)
    left, width, start = box
    offset = round(left + fraction * width - start)
    ActionChains(driver).click_and_hold(handle).move_by_offset(offset // 2, 0).move_by_offset(
        offset - offset // 2, 0).release().perform()


def alert(driver):
    """The console's question, once it is up."""
    from selenium.webdriver.support import expected_conditions

    return wait(driver, expected_conditions.alert_is_present())


def test_drag_preview_and_apply(browser, live):
    served = live.http.get("/v1/categories/widget/scores", headers=ADMIN).json()
    assert len(served["recorded"]) == 10 and served["decision"]["expected_recall"] > 0  # something to move
    open_console(browser, live.url, "admin-key")
    wait(browser, lambda d: len(d.find_elements("css selector", LIVE)) == 4)
    browser.get_log("browser")  # drain the page's first keyless call (401); from here on no error is expected
    browser.execute_script("document.getElementById('threshold-section').scrollIntoView()")
    assert {e.get_attribute("data-series") for e in browser.find_elements("css selector", "#thv-chart path")} == {
        "normal", "synthetic_defects", "recorded"}  # one shape per kind present (no confirmed images yet)
    start = shares(browser)
    assert start[0] == served["decision"]["threshold"]
    assert start[1:] == pytest.approx(expected(served, start[0]))

    drag_to(browser, 0.99)  # right: a stricter line flags less of everything
    wait(browser, lambda d: shares(d)[0] > start[0])
    right = shares(browser)
    assert right[1:] == pytest.approx(expected(served, right[0]))
    assert right[1] <= start[1] and right[2] < start[2] and right[3] <= start[3]

    drag_to(browser, 0.01)  # left, below every score: everything is flagged
    wait(browser, lambda d: shares(d)[0] < start[0])
    left = shares(browser)
    assert left[1:] == pytest.approx(expected(served, left[0])) == (1.0, 1.0, 1.0)
    assert left[1] > right[1] and left[2] > right[2] and left[3] > right[3]

    browser.find_element("id", "thv-preview").click()
    wait(browser, lambda d: d.find_element("id", "thv-server").get_attribute("data-warnings"))
    assert int(browser.find_element("id", "thv-server").get_attribute("data-warnings")) > 0
    assert "of 10 flagged" in text_of(browser, "thv-server")  # the server's count on the recorded traffic
    assert "half of the good parts" in text_of(browser, "thv-server")  # its warning, shown before applying

    browser.find_element("id", "thv-apply").click()
    alert(browser).dismiss()  # the operator says no: nothing changes
    wait(browser, lambda d: "not changed" in text_of(d, "message"))
    assert live.http.get("/v1/categories/widget", headers=ADMIN).json()["active_version"] == 1

    browser.find_element("id", "thv-apply").click()
    alert(browser).accept()
    wait(browser, lambda d: "version 2" in text_of(d, "thv-note"))
    detail = live.http.get("/v1/categories/widget", headers=ADMIN).json()
    assert detail["active_version"] == 2 and detail["decision"]["threshold"] == pytest.approx(left[0])
    assert shares(browser)[0] == pytest.approx(left[0])  # the reloaded view starts at the applied line
    assert_loaded_offline(browser, live.url)
