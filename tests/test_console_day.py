"""The console through a day on the line, in a real headless Chromium against a real server on loopback:
registration with an ordinary description, the products table inside the window, result cards that follow the
serving version, and a fine-tune box that matches what the backbone can do."""

from __future__ import annotations

import pytest
from threaded_server import threaded_server

from app.client import Client
from app.core.config import Settings
from tests.helpers.browser import accept_if_asked, browser, click, open_console, text_of, wait
from tests.helpers.predict import defect, good, png

__all__ = ["browser"]  # the fixture, imported for pytest
ADMIN_KEY = "day-admin-key"
PRODUCT = "widget-with-a-rather-long-product-name"  # long names are what widened the trial's table
ROW = f'#product-list tr[data-category="{PRODUCT}"]'


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_backbone):
    settings = Settings(_env_file=None, backbone="test:tiny-clip", device="cpu",
                        store=tmp_path_factory.mktemp("store"), admin_keys=[ADMIN_KEY], client_keys=[],
                        finetune_steps=2, finetune_seconds=60)
    with threaded_server(settings, tiny_backbone) as url:
        with Client(url, ADMIN_KEY) as client:  # the product the later tests look at, registered through the API
            client.register(PRODUCT, [png(good(s)) for s in range(4)], finetune=False)
        yield url


def connect(driver, url: str) -> None:
    open_console(driver, url, ADMIN_KEY)
    wait(driver, lambda d: text_of(d, "status") == "connected")


def write_pngs(folder, images: dict) -> list[str]:
    paths = []
    for name, image in images.items():
        path = folder / name
        path.write_bytes(png(image))
        paths.append(str(path))
    return paths


def test_a_description_with_punctuation_registers(browser, server, tmp_path):
    connect(browser, server)
    browser.find_element("id", "reg-category").send_keys("bottle")
    browser.find_element("id", "reg-description").send_keys("glass bottle, top view")
    browser.find_element("id", "reg-finetune").click()  # untick: no job needed here
    shots = write_pngs(tmp_path, {f"g{s}.png": good(s) for s in range(4)})
    browser.find_element("id", "reg-files").send_keys("\n".join(shots))
    browser.find_element("id", "reg-submit").click()
    wait(browser, lambda d: "version 1 serves now" in text_of(d, "reg-result") or "pattern" in text_of(d, "message"))
    assert "version 1 serves now" in text_of(browser, "reg-result"), text_of(browser, "message")
    with Client(server, ADMIN_KEY) as client:
        assert client.category("bottle").versions[0].object_name == "glass bottle, top view"


def test_the_products_table_stays_inside_the_window(browser, server):
    """At the 1400 px window the trial used, every section ends inside the window, none overlaps its neighbour,
    and the products table shows all its columns."""
    connect(browser, server)
    wait(browser, lambda d: d.find_elements("css selector", ROW))
    boxes = browser.execute_script("""
        return [...document.querySelectorAll("main > section")].map((s) => s.getBoundingClientRect().toJSON())
          .concat([document.documentElement.clientWidth]);""")
    *sections, width = boxes
    assert all(box["right"] <= width + 0.5 for box in sections), (sections, width)
    rows = sorted(sections, key=lambda b: (round(b["top"]), b["left"]))
    for left, right in zip(rows, rows[1:], strict=False):
        if round(left["top"]) == round(right["top"]):
            assert left["right"] <= right["left"], (left, right)  # side by side: no overlap
    # Every column is visible without scrolling the table sideways (the trial's table hid recall that way).
    scroll, client = browser.execute_script(
        "const t = document.getElementById('products'); return [t.scrollWidth, t.clientWidth];")
    assert scroll <= client, (scroll, client)


def test_result_cards_follow_a_version_change(browser, server, tmp_path):
    """A card scored by version N is scored again when a threshold change makes version N+1 serve."""
    connect(browser, server)
    click(browser, ROW)
    browser.find_element("id", "try-files").send_keys("\n".join(write_pngs(tmp_path, {"t.png": defect(50)})))
    card = wait(browser, lambda d: d.find_elements("css selector", "#results .result"))[0]
    first = int(card.find_element("css selector", ".version").text)
    browser.find_element("css selector", "#thr-mode option[value='threshold']").click()
    browser.find_element("id", "thr-value").send_keys("1000000")  # above every score: every part passes
    browser.find_element("id", "thr-submit").click()
    accept_if_asked(browser)  # the server warns that this switches detection off; the test means it
    wait(browser, lambda d: card.find_element("css selector", ".version").text == str(first + 1))
    assert card.find_element("css selector", ".threshold").text == "1000000.0000"
    assert card.get_attribute("data-verdict") == "normal"  # nothing reaches that threshold
    with Client(server, ADMIN_KEY) as client:
        client.set_threshold(PRODUCT, auto=True)


@pytest.fixture(scope="module")
def cnn_server(tmp_path_factory):
    """A service on a backbone without a text tower (EfficientNet): it can serve memory adapters only."""
    from clipshot.backbone import load_backbone

    backbone = load_backbone("imagenet:efficientnet-lite0", image_size=64)
    settings = Settings(_env_file=None, backbone="imagenet:efficientnet-lite0", device="cpu",
                        store=tmp_path_factory.mktemp("cnn-store"), admin_keys=[ADMIN_KEY], client_keys=[])
    with threaded_server(settings, backbone) as url:
        yield url


def test_the_finetune_box_is_off_where_the_backbone_cannot_finetune(browser, cnn_server, server):
    connect(browser, cnn_server)
    box = browser.find_element("id", "reg-finetune")
    wait(browser, lambda d: not box.is_enabled())
    assert not box.is_selected()
    assert "cannot be fine-tuned" in box.find_element("xpath", "..").get_attribute("title")
    connect(browser, server)  # a CLIP backbone: the box is offered and ticked by default
    box = browser.find_element("id", "reg-finetune")
    wait(browser, lambda d: box.get_attribute("data-checked-by") == "readyz")
    assert box.is_enabled() and box.is_selected()
