"""The record's kept pictures over HTTP: the image as kept, a thumbnail for lists, and the overlay the client
was answered; behind the client keys like the listing, 404 where nothing was kept."""

from __future__ import annotations

import io
import os
import threading
import time

import pytest
from PIL import ExifTags, Image

from app.records.writer import WRITER_NICE
from tests.helpers.predict import good
from tests.helpers.records import ADMIN, CLIENT, recording

THUMB = 32  # record_thumbnail_size below: smaller than the 96 px uploads, so a thumbnail must be made


def picture(response) -> Image.Image:
    assert response.status_code == 200, response.text
    return Image.open(io.BytesIO(response.content))


@pytest.mark.parametrize("mode", ["thumbnails", "full"])
def test_kept_pictures_are_served_to_client_keys(mode, tmp_path, tiny_backbone):
    with recording(tmp_path / "store", tiny_backbone, record_mode=mode, record_thumbnail_size=THUMB) as live:
        live.predict([11], size=(96, 64))
        live.drain()
        (row,) = live.inspections().json()["inspections"]
        base = f"/v1/categories/widget/inspections/{row['id']}"
        image = picture(live.http.get(f"{base}/image", headers=CLIENT))
        # thumbnails mode keeps a THUMB px JPEG; full mode keeps the upload itself (96 x 64 PNG)
        assert image.size == ((THUMB, THUMB * 2 // 3) if mode == "thumbnails" else (96, 64))
        thumb = picture(live.http.get(f"{base}/thumbnail", headers=CLIENT))
        assert (thumb.format, max(thumb.size)) == ("JPEG", THUMB)
        overlay = picture(live.http.get(f"{base}/overlay", headers=ADMIN))
        assert max(overlay.size) == (THUMB if mode == "thumbnails" else 96)
        for suffix in ("image", "thumbnail", "overlay"):
            assert live.http.get(f"{base}/{suffix}").status_code == 401  # no key
            other = live.http.get(f"/v1/categories/gadget/inspections/{row['id']}/{suffix}", headers=CLIENT)
            assert other.status_code == 404  # an id only answers under its own product
        missing = live.http.get("/v1/categories/widget/inspections/999999/image", headers=CLIENT)
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
        assert live.http.get("/v1/categories/widget/inspections/0/image", headers=CLIENT).status_code == 422
        assert live.http.get("/v1/categories/Bad!/inspections/1/image", headers=CLIENT).status_code == 400


def test_verdicts_mode_keeps_no_picture(tmp_path, tiny_backbone):
    with recording(tmp_path / "store", tiny_backbone, record_mode="verdicts") as live:
        live.predict([12])
        live.drain()
        (row,) = live.inspections().json()["inspections"]
        for suffix in ("image", "thumbnail", "overlay"):
            r = live.http.get(f"/v1/categories/widget/inspections/{row['id']}/{suffix}", headers=CLIENT)
            assert r.status_code == 404 and "no kept" in r.json()["error"]["message"]


def test_a_thumbnail_is_the_picture_the_prediction_judged(tmp_path, tiny_backbone):
    """A phone photo stored sideways with an EXIF turn is judged upright; its thumbnail (and overlay) must show
    it as judged, not as stored."""
    stored = good(11, (96, 64))  # landscape as stored ...
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6  # ... shown turned 90 degrees clockwise: portrait, 64 x 96
    buffer = io.BytesIO()
    stored.save(buffer, format="JPEG", exif=exif)
    with recording(tmp_path / "store", tiny_backbone, record_mode="thumbnails", record_thumbnail_size=THUMB) as live:
        response = live.http.post("/v1/categories/widget/predict", headers=CLIENT,
                                  files=[("files", ("phone.jpg", buffer.getvalue(), "image/jpeg"))])
        assert response.status_code == 200, response.text
        live.drain()
        (row,) = live.inspections().json()["inspections"]
        base = f"/v1/categories/widget/inspections/{row['id']}"
        kept = picture(live.http.get(f"{base}/image", headers=CLIENT))
        overlay = picture(live.http.get(f"{base}/overlay", headers=CLIENT))
    assert kept.size == (THUMB * 2 // 3, THUMB)  # portrait, longer side THUMB, as the model saw it
    assert overlay.size[0] < overlay.size[1]  # the overlay was drawn on the upright picture too


def test_the_record_writer_yields_the_cpu_to_predictions(tmp_path, tiny_backbone):
    """The writer's picture work must not take a core from a forward: its thread runs WRITER_NICE nicer than
    the server's (Linux gives each thread its own nice value)."""
    with recording(tmp_path / "store", tiny_backbone, record_mode="thumbnails", register=False) as live:
        writer = live.records.writer._thread
        expected = min(19, os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) + WRITER_NICE)
        deadline = time.monotonic() + 10  # the thread renices itself as it starts
        while os.getpriority(os.PRIO_PROCESS, writer.native_id) != expected and time.monotonic() < deadline:
            time.sleep(0.05)
        assert os.getpriority(os.PRIO_PROCESS, writer.native_id) == expected
