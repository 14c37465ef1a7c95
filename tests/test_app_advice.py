"""Answers people can read, over real HTTP (tiny random CLIP): normalised scores, threshold changes that switch
inspection off, and uploads unlike the product's shots (warned about, or refused when the settings say so)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.core.advice import COLOUR_CHROMA, FALSE_ALARM_HIGH, MAX_UPSCALE
from app.main import create_app
from tests.test_app_categories import ADMIN, CLIENT, image_bytes, make_settings, snapshot
from tests.test_app_decisions import manifest, metric, register

SHOT_SIDE = 64  # image_bytes' default: the shots registered below are 64 x 64 colour PNGs


def upload(name: str, data: bytes) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (name, data, "image/png"))]


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def part(size: tuple[int, int] = (SHOT_SIDE, SHOT_SIDE), mode: str = "RGB", seed: int = 50) -> bytes:
    """A good part like the shots, resized to ``size`` (width, height) and stored in ``mode``."""
    image = Image.open(io.BytesIO(image_bytes(seed))).convert("RGB").resize(size, Image.BILINEAR)
    return png(image.convert(mode))


def predict_one(client: TestClient, data: bytes, name: str = "part.png") -> dict:
    r = client.post("/v1/categories/widget/predict", headers=CLIENT, files=upload(name, data),
                    params={"heatmap": "none"})
    assert r.status_code == 200, r.text
    (prediction,) = r.json()["predictions"]
    return prediction


@pytest.fixture()
def client(tmp_path, tiny_backbone):
    with TestClient(create_app(make_settings(tmp_path / "store"), backbone=tiny_backbone)) as c:
        yield c


def test_every_prediction_reads_against_its_threshold(client):
    register(client)
    r = client.post("/v1/categories/widget/predict", headers=CLIENT, params={"heatmap": "none"},
                    files=[("files", (f"p{s}.png", image_bytes(s), "image/png")) for s in (10, 11)]
                    + upload("p12.png", part(seed=12)))
    assert r.status_code == 200, r.text
    for p in r.json()["predictions"]:
        assert p["score_normalized"] == pytest.approx(p["score"] / p["threshold"], rel=1e-9)
        assert p["is_anomalous"] == (p["score_normalized"] > 1.0)  # 1.0 is the threshold itself


def test_a_threshold_that_stops_inspecting_answers_with_warnings_and_a_preview_writes_nothing(client):
    store = client.app.state.store.root
    register(client)
    decision = client.get("/v1/categories/widget", headers=CLIENT).json()["decision"]
    assert decision["expected_recall"] is not None  # synthetic defects are the recall evidence
    ordinary = client.put("/v1/categories/widget/threshold", headers=ADMIN, json={"target_false_alarm_rate": 0.05})
    assert ordinary.status_code == 200 and ordinary.json()["warnings"] == []

    before = snapshot(store)
    off = {"threshold": 1e6}  # far above every score the evidence holds: nothing is ever flagged
    preview = client.put("/v1/categories/widget/threshold", headers=ADMIN, json=off, params={"dry_run": "true"})
    assert preview.status_code == 200, preview.text
    body = preview.json()
    assert body["dry_run"] is True and body["version"] == ordinary.json()["version"]  # the version serving now
    assert body["decision"]["expected_recall"] == 0.0
    assert any("detection is effectively off" in w for w in body["warnings"])
    assert snapshot(store) == before  # a preview changes nothing

    applied = client.put("/v1/categories/widget/threshold", headers=ADMIN, json=off)
    assert applied.status_code == 200  # the operator may still do it; the answer says what it means
    assert applied.json()["dry_run"] is False and applied.json()["version"] == body["version"] + 1
    assert applied.json()["warnings"] == body["warnings"]

    everything = client.put("/v1/categories/widget/threshold", headers=ADMIN, json={"threshold": 0.0})
    rate = everything.json()["decision"]["expected_false_alarm_rate"]
    assert rate >= FALSE_ALARM_HIGH  # every good score is above 0
    assert any("at least half of the good parts" in w for w in everything.json()["warnings"])


def test_uploads_unlike_the_shots_are_answered_with_warnings(client):
    store = client.app.state.store.root
    register(client)
    facts = manifest(store, "widget", 1)["adapter"]["shot_images"]
    assert facts["size"] == [SHOT_SIDE, SHOT_SIDE] and facts["count"] == 4
    assert facts["chroma"] >= COLOUR_CHROMA  # the shots are clearly coloured

    assert predict_one(client, part())["warnings"] == []
    # 40 px is enlarged 1.6x beyond the shots (under the 2x bar): no warning; 24 px is 2.7x: warned
    assert SHOT_SIDE / 40 < MAX_UPSCALE < SHOT_SIDE / 24
    assert predict_one(client, part((40, 40)))["warnings"] == []
    (small,) = predict_one(client, part((24, 24)))["warnings"]
    assert "far smaller than the product's shots (64x64)" in small
    (grey,) = predict_one(client, part(mode="L"))["warnings"]
    assert "greyscale" in grey
    # a greyscale photo saved as RGB is caught by its pixels, not its file mode
    grey_as_rgb = png(Image.open(io.BytesIO(part(mode="L"))).convert("RGB"))
    (grey_rgb,) = predict_one(client, grey_as_rgb)["warnings"]
    assert "greyscale" in grey_rgb
    (aspect,) = predict_one(client, part((SHOT_SIDE, 2 * SHOT_SIDE)))["warnings"]
    assert "aspect ratio 0.50" in aspect
    scrape = client.get("/metrics").text
    assert metric(scrape, "clipshot_mismatched_images_total", category="widget") == 4  # small, 2 grey, aspect


def test_the_setting_refuses_mismatched_uploads_before_scoring(tmp_path, tiny_backbone):
    settings = make_settings(tmp_path / "store", refuse_mismatched_images=True)
    with TestClient(create_app(settings, backbone=tiny_backbone)) as client:
        register(client)
        r = client.post("/v1/categories/widget/predict", headers=CLIENT, params={"heatmap": "none"},
                        files=upload("ok.png", part()) + upload("grey.png", part(mode="L")))
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["code"] == "image_mismatch" and error["message"].startswith("grey.png: image is greyscale")
        assert predict_one(client, part())["warnings"] == []


def test_chroma_bars_separate_grey_from_the_least_colourful_product():
    """The bars in app/core/advice.py: grey decodes to 0 spread; a faintly tinted part stays 'colour'."""
    from app.core.advice import GREY_CHROMA, chroma

    grey = Image.open(io.BytesIO(part(mode="L"))).convert("RGB")
    assert chroma(grey) < GREY_CHROMA
    pixels = np.asarray(grey, dtype=np.int16)
    tinted = Image.fromarray(np.clip(pixels + np.array([4, 0, -4]), 0, 255).astype(np.uint8))  # 8 levels spread
    assert chroma(tinted) >= COLOUR_CHROMA
