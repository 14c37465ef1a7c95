"""The console follows registration and feedback as jobs, in a real headless Chromium against a real server on
loopback: the progress bar shows the fit's stages with done/total while it runs, then the result as before."""

from __future__ import annotations

import pytest
from threaded_server import threaded_server

from app.core.config import Settings
from app.main import create_app
from tests.helpers.browser import browser, open_console, text_of, wait
from tests.helpers.predict import defect, good, png

__all__ = ["browser"]  # the fixture, imported for pytest
ADMIN_KEY = "refit-admin-key"
# Every text the bar's stage line takes, recorded in the page as it changes (a poll from here could miss some).
RECORD_STAGES = """
  window.stagesSeen = [];
  new MutationObserver(() => window.stagesSeen.push(
      [document.getElementById('refit-label').textContent, document.getElementById('refit-stage').textContent,
       document.getElementById('refit').hidden]))
    .observe(document.getElementById('refit-stage'), {childList: true, characterData: true, subtree: true});
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_backbone):
    settings = Settings(_env_file=None, backbone="test:tiny-clip", device="cpu", max_shots=16,
                        store=tmp_path_factory.mktemp("store"), admin_keys=[ADMIN_KEY], client_keys=[])
    app = create_app(settings, backbone=tiny_backbone)
    with threaded_server(settings, app=app) as url:
        app.state.refit_jobs.interval = 0.01  # every stage change reaches the record for the console to show
        yield url


def test_registration_and_feedback_show_the_fits_progress_then_the_result(browser, server, tmp_path):
    open_console(browser, server, ADMIN_KEY)
    wait(browser, lambda d: text_of(d, "status") == "connected")
    assert not browser.find_element("id", "refit").is_displayed()
    browser.execute_script(RECORD_STAGES)

    browser.find_element("id", "reg-category").send_keys("widget")
    browser.find_element("id", "reg-finetune").click()  # untick: only the registration's own fit here
    paths = []
    for s in range(16):  # 16 shots at 96 px: a fit of a few seconds here, several polls of the bar
        path = tmp_path / f"g{s}.png"
        path.write_bytes(png(good(s, (96, 96))))
        paths.append(str(path))
    browser.find_element("id", "reg-files").send_keys("\n".join(paths))
    browser.find_element("id", "reg-submit").click()
    wait(browser, lambda d: "version 1 serves now" in text_of(d, "reg-result") or "ing" in text_of(d, "message"))
    assert "version 1 serves now (16 shots, 16 new)" in text_of(browser, "reg-result"), text_of(browser, "message")
    seen = browser.execute_script("return window.stagesSeen;")
    assert all(label == "Registering widget" and not hidden for label, _, hidden in seen), seen
    running = [stage for _, stage, _ in seen if "/" in stage]  # "<stage> <done>/<total>" while the fit ran
    assert running, seen
    assert seen[-1][1] == "done: version 1 serves", seen
    assert browser.find_element("id", "refit-progress").get_attribute("value") == "1"

    browser.execute_script("window.stagesSeen = [];")
    browser.find_element("id", "try-files").send_keys(str(_write(tmp_path / "d.png", png(defect(50)))))
    card = wait(browser, lambda d: d.find_elements("css selector", "#results .result"))[0]
    card.find_element("css selector", ".mark-defect").click()
    out = card.find_element("css selector", ".feedback-result")
    wait(browser, lambda d: "saved as version 2" in out.text or "Feedback" in text_of(d, "message"))
    assert "saved as version 2" in out.text, text_of(browser, "message")
    seen = browser.execute_script("return window.stagesSeen;")
    assert seen and all(label == "Feedback for widget" for label, _, _ in seen), seen
    assert seen[-1][1] == "done: version 2 serves", seen


def _write(path, data: bytes):
    path.write_bytes(data)
    return path
