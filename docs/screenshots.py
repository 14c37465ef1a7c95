"""Take the console's screenshots for the docs: ``PYTHONPATH=. python docs/screenshots.py`` (needs Chromium +
chromedriver, like tests/test_console_browser.py). Starts a real server on loopback with the tiny test backbone and
the record in thumbnails mode, registers a product from generated images, scores a few, and saves each page
section under docs/screenshots/*.png. The images are synthetic: the pictures show the layout, not a model. For the
product page's trend chart, the record also gets a day of synthetic rows whose scores creep up (``drifting_day``):
the chart shows what drift looks like, not a measurement."""

from __future__ import annotations

import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from PIL import Image  # noqa: E402
from selenium import webdriver  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from app.records.pages import time_text  # noqa: E402
from clipshot.backbone import load_backbone  # noqa: E402
from tests.helpers.predict import defect, good, png  # noqa: E402
from tests.helpers.records import recording  # noqa: E402

OUT = ROOT / "docs" / "screenshots"


def drifting_day(threshold: float, typical: float) -> list[dict]:
    """Record rows for the 23 hours before this one: 12 parts an hour whose normalised scores start around
    ``typical`` (the good shots' mean) and creep up by a third of it, a few crossing the threshold late in the
    day (synthetic, for the chart only)."""
    rows, now = [], datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    for hour in range(23, 0, -1):
        for part in range(12):
            drift = (23 - hour) / 23
            normalized = typical * (0.95 + 0.4 * drift + 0.03 * (part % 5)) + (0.3 if part == 11 and hour < 6 else 0)
            rows.append({"time": time_text(now - timedelta(hours=hour, minutes=-4 * part)), "category": "widget",
                         "version": 2, "score": normalized * threshold, "score_normalized": normalized,
                         "verdict": "anomalous" if normalized > 1 else "normal", "threshold": threshold,
                         "map_threshold": threshold, "request_id": None, "part_id": f"S-{hour}-{part}",
                         "line": "L1", "camera": None, "filename": None, "sha256": f"{hour:032x}{part:032x}",
                         "image_bytes": 0, "replica": "screenshots"})
    return rows


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1000"):
        options.add_argument(arg)
    with tempfile.TemporaryDirectory() as store, \
            recording(Path(store), load_backbone("test:tiny-clip"), record_mode="thumbnails") as live:
        for seed in range(6):
            image = good(seed) if seed % 2 else defect(seed)
            live.http.post("/v1/categories/widget/predict", headers={"Authorization": "Bearer client-key"},
                           files=[("files", (f"part{seed}.png", png(image), "image/png"))],
                           data={"part_id": f"P-{seed}", "line": "L1"})
        live.drain()
        driver = webdriver.Chrome(options=options)
        try:
            driver.get(live.url + "/console")
            driver.find_element("id", "key").send_keys("admin-key")
            driver.find_element("id", "connect").click()
            time.sleep(2)
            driver.find_element("css selector", '#product-list tr[data-category="widget"]').click()
            shot = Path(store) / "try.png"
            shot.write_bytes(png(defect(40)))
            driver.find_element("id", "try-files").send_keys(str(shot))
            time.sleep(3)
            driver.save_screenshot(str(OUT / "console.png"))
            driver.find_element("id", "hist-show").click()
            WebDriverWait(driver, 60).until(lambda d: d.find_elements("css selector", "#history .inspection img[src]"))
            time.sleep(1)
            driver.set_window_size(1400, driver.execute_script("return document.body.scrollHeight") + 120)
            time.sleep(1)
            driver.save_screenshot(str(OUT / "history.png"))  # the whole page, History at the bottom
            threshold_view(driver)
            product_view(driver, live)
        finally:
            driver.quit()
    for path in OUT.glob("*.png"):  # 256 colours: a quarter of the bytes, no visible loss on a UI
        with Image.open(path) as image:
            small = image.convert("RGB").quantize(256)
        small.save(path, optimize=True)
    print("\n".join(str(p.relative_to(ROOT)) for p in sorted(OUT.glob("*.png"))))


def threshold_view(driver: webdriver.Chrome) -> None:
    """The threshold histogram with its line dragged a little left of the served one and previewed."""
    section = driver.find_element("id", "threshold-section")
    driver.execute_script("arguments[0].dispatchEvent(new Event('change'))", driver.find_element("id", "thv-category"))
    time.sleep(1)  # reloaded: the recorded scores include the image tried above
    driver.execute_script("arguments[0].scrollIntoView()", section)
    handle = driver.find_element("id", "thv-handle")
    ActionChains(driver).click_and_hold(handle).move_by_offset(-60, 0).release().perform()
    driver.find_element("id", "thv-preview").click()
    WebDriverWait(driver, 60).until(lambda d: d.find_element("id", "thv-server").get_attribute("data-warnings"))
    driver.set_window_size(1400, driver.execute_script("return document.body.scrollHeight") + 120)
    time.sleep(0.5)
    section.screenshot(str(OUT / "threshold.png"))


def product_view(driver: webdriver.Chrome, live) -> None:
    """The product page after a day of drift (taken last: its version 2 and synthetic rows are for it alone)."""
    # Version 2: a stricter manual threshold (the tiny random backbone's own sits right on its good shots),
    # so the page shows a version to roll back to and a calibration below the threshold.
    first = live.http.get("/v1/categories/widget", headers={"Authorization": "Bearer client-key"}).json()
    live.http.put("/v1/categories/widget/threshold", headers={"Authorization": "Bearer admin-key"},
                  json={"threshold": 1.5 * first["decision"]["threshold"]})
    reference = live.http.get("/v1/categories/widget/inspections/trend",
                              headers={"Authorization": "Bearer client-key"}).json()["reference"]
    live.records.inspections.insert(drifting_day(reference["threshold"], reference["score_mean"]))
    driver.set_window_size(1400, 1000)
    driver.get(live.url + "/console#product/widget")  # reconnects with the tab's key and opens the page
    WebDriverWait(driver, 60).until(lambda d: d.find_elements("css selector", "#page-shots .shot img[src]")
                                    and d.find_elements("css selector", "#page-chart svg.trend .dot"))
    time.sleep(1)
    driver.set_window_size(1400, driver.execute_script("return document.body.scrollHeight") + 120)
    time.sleep(1)
    driver.save_screenshot(str(OUT / "product.png"))  # the product page: versions, shots, trend


if __name__ == "__main__":
    main()
