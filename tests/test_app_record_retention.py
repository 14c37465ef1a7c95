"""The record's limits, enforced by the service itself: retention by count and by bytes after writes, and a full
writer queue that drops (and counts) inspections while every prediction is still answered. Real server on
loopback; the queue is made tiny through the settings, not by stubbing the writer."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx

from app.records.record_db import LATEST, open_record_database
from tests.helpers.predict import good, png
from tests.helpers.records import CLIENT, recording
from tests.helpers.serving import total


def test_retention_by_count_keeps_each_products_newest(tmp_path, tiny_backbone):
    with recording(tmp_path / "store", tiny_backbone, record_max_count=3, record_retention_interval_s=0) as live:
        answers = [live.predict([seed], data={"part_id": f"p{seed}"}) for seed in range(11, 16)]
        live.drain()
        rows = live.inspections().json()["inspections"]
        assert [r["part_id"] for r in rows] == ["p15", "p14", "p13"]
        assert [r["sha256"] for r in rows] == [a.json()["predictions"][0]["sha256"] for a in answers[:1:-1]]


def test_retention_by_bytes_drops_the_oldest_images_and_keeps_their_rows(tmp_path, tiny_backbone):
    with recording(tmp_path / "store", tiny_backbone, record_mode="thumbnails", record_retention_interval_s=0,
                   record_max_image_bytes=9_000) as live:
        for seed in range(11, 16):
            live.predict([seed])  # one at a time: retention runs after each write
        live.drain()
        rows = live.inspections().json()["inspections"]
        assert len(rows) == 5  # the byte limit removes pictures, never the verdicts
        with_images = [r for r in rows if r["image_path"]]
        # A thumbnail and its overlay take about 4 KB here, so two inspections fit under 9000 bytes.
        assert 1 <= len(with_images) < 5 and sum(r["image_bytes"] for r in rows) <= 9_000
        assert rows[0]["image_path"], "the newest inspection keeps its images"
        kept = {p.relative_to(live.records.inspections.image_dir).as_posix()
                for p in live.records.inspections.image_dir.rglob("*") if p.is_file()}
        assert kept == {r[k] for r in with_images for k in ("image_path", "overlay_path")}


def test_a_full_queue_drops_inspections_counts_them_and_answers_every_prediction(tmp_path, tiny_backbone):
    # Queue size 1 and thumbnails (a few ms of writer work per image): 8 clients x 4 images outrun the writer.
    with recording(tmp_path / "store", tiny_backbone, record_mode="thumbnails", record_queue_size=1) as live:
        files = [("files", (f"i{s}.png", png(good(s)), "image/png")) for s in range(11, 15)]

        def predict(_: int) -> int:
            with httpx.Client(base_url=live.url, timeout=120) as http:
                return http.post("/v1/categories/widget/predict", files=files, headers=CLIENT).status_code

        with ThreadPoolExecutor(8) as pool:
            assert list(pool.map(predict, range(8))) == [200] * 8
        live.drain()
        recorded = len(live.inspections(limit=1000).json()["inspections"])
        metrics = live.http.get("/metrics").text
        dropped = total(metrics, "clipshot_records_dropped_total", reason="queue_full")
        assert dropped > 0 and recorded + dropped == 32
        assert total(metrics, "clipshot_records_dropped_total", reason="write_failed") == 0


def test_the_schema_is_versioned_and_reopening_migrates_nothing_twice(tmp_path):
    db = open_record_database(tmp_path)
    db.close()
    db = open_record_database(tmp_path)  # a second start: the tables exist, no "already exists" error
    with db.tx() as tx:
        assert tx.all("SELECT component, version FROM schema_version") == [{"component": "records",
                                                                            "version": LATEST}]
        tx.run("UPDATE schema_version SET version = ?", (LATEST + 1,))
    db.close()
    try:
        open_record_database(tmp_path)
    except RuntimeError as exc:  # JobDatabaseError: a newer clipshot's tables are not touched
        assert "newer than this clipshot" in str(exc)
    else:
        raise AssertionError("a record schema from a newer release must refuse to open")
