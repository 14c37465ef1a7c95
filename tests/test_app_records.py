"""The inspection record against a real server on loopback, on the embedded SQLite file and on PostgreSQL: one row
per predicted image with the client's part id, line and camera; filters; cursor pages that neither repeat nor skip
while rows share a time stamp; the CSV export; deletion by age with the kept images."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime, timedelta

import pytest

from app.records.pages import time_text
from tests.helpers.records import ADMIN, CLIENT, backend_url, recording

BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture(params=BACKENDS)
def live(request, tmp_path, tiny_backbone):
    with recording(tmp_path / "store", tiny_backbone, job_db=backend_url(request, request.param)) as server:
        yield server


def _row(i: int, time: str, **fields) -> dict:
    """A row as the writer makes it, for times and values a live prediction cannot choose."""
    return {"time": time, "category": "widget", "version": 1, "score": 0.1 * i, "score_normalized": 0.2 * i,
            "verdict": "anomalous" if i % 3 == 0 else "normal", "threshold": 0.5, "map_threshold": 0.5,
            "request_id": f"r{i}", "part_id": f"p{i % 4}", "line": "L1", "camera": "c1", "filename": f"{i}.png",
            "sha256": f"{i:064x}", "image_bytes": 0, "replica": "test", **fields}


def test_each_predicted_image_is_recorded_with_the_client_fields(live):
    by_form = live.predict([11, 12], data={"part_id": "P-1", "line": "L1", "camera": "cam-a"},
                           headers={"X-Request-ID": "req-form"})
    by_header = live.predict([13], headers={"X-Clipshot-Part-Id": "P-2", "X-Clipshot-Line": "L2",
                                            "X-Request-ID": "req-header"})
    live.drain()
    page = live.inspections().json()
    rows = page["inspections"]
    assert page["next_cursor"] is None and len(rows) == 3
    newest_first = [p for r in (by_header, by_form) for p in reversed(r.json()["predictions"])]
    for row, pred in zip(rows, newest_first, strict=True):
        assert (row["sha256"], row["score"], row["version"]) == (pred["sha256"], pred["score"], 1)
        assert row["score_normalized"] == pytest.approx(pred["score_normalized"])
        assert row["map_threshold"] == pytest.approx(pred["map_threshold"])
        assert row["verdict"] == ("anomalous" if pred["is_anomalous"] else "normal")
    assert [(r["part_id"], r["line"], r["camera"], r["request_id"]) for r in rows] == [
        ("P-2", "L2", None, "req-header"), ("P-1", "L1", "cam-a", "req-form"), ("P-1", "L1", "cam-a", "req-form")]
    assert rows[0]["image_path"] is None  # verdicts mode keeps no images


def test_filters_and_pages_walk_every_row_once(live):
    base = datetime(2024, 5, 1, tzinfo=UTC)
    # 25 rows, five per time stamp: pages must cut through rows of equal time without repeating or skipping.
    rows = [_row(i, time_text(base + timedelta(minutes=i // 5)), version=1 + i % 2) for i in range(25)]
    live.records.inspections.insert(rows)
    seen, cursor, pages = [], None, 0
    while True:
        params = {"limit": 4} | ({"cursor": cursor} if cursor else {})
        page = live.inspections(**params).json()
        seen += page["inspections"]
        pages, cursor = pages + 1, page["next_cursor"]
        if cursor is None:
            break
    assert pages == 7  # 25 rows / 4 per page
    ids = [r["id"] for r in seen]
    assert len(ids) == len(set(ids)) == 25
    assert [(r["time"], r["id"]) for r in seen] == sorted(((r["time"], r["id"]) for r in seen), reverse=True)

    def sha(**params):
        return {r["sha256"] for r in live.inspections(limit=1000, **params).json()["inspections"]}

    def expect(keep):
        return {r["sha256"] for i, r in enumerate(rows) if keep(i)}

    assert sha(verdict="anomalous") == expect(lambda i: i % 3 == 0)
    assert sha(part_id="p1") == expect(lambda i: i % 4 == 1)
    assert sha(version=2) == expect(lambda i: i % 2 == 1)
    assert sha(min_score=0.5, max_score=1.0) == expect(lambda i: 0.5 <= 0.1 * i <= 1.0)
    # since is inclusive, until exclusive: minutes 1 and 2 are rows 5..14
    assert sha(since="2024-05-01T00:01:00Z", until="2024-05-01T00:03:00Z") == expect(lambda i: 5 <= i < 15)
    assert sha(since="2024-05-01T02:01:00+02:00", verdict="normal") == expect(lambda i: i >= 5 and i % 3)
    assert live.inspections(category="other").json() == {"inspections": [], "next_cursor": None}


def test_bad_queries_get_the_error_shape(live):
    for params, code in (({"cursor": "not-a-cursor"}, "invalid_cursor"), ({"verdict": "maybe"}, "validation_error"),
                         ({"limit": 0}, "validation_error"), ({"since": "yesterday"}, "validation_error")):
        response = live.inspections(**params)
        assert response.status_code in (400, 422), (params, response.text)
        assert response.json()["error"]["code"] == code
    assert live.inspections(category="Bad Name!").status_code in (400, 422)


def test_csv_export_matches_the_listing(live):
    live.predict([11, 12, 13], data={"part_id": "P,with \"quotes\""})
    live.drain()
    listed = live.inspections().json()["inspections"]
    for response in (live.inspections(format="csv"),
                     live.http.get("/v1/categories/widget/inspections.csv", headers=CLIENT)):
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/csv")
        table = list(csv.DictReader(io.StringIO(response.text)))
        assert [int(r["id"]) for r in table] == [r["id"] for r in listed]
        assert {r["part_id"] for r in table} == {'P,with "quotes"'}
        assert [float(r["score"]) for r in table] == [r["score"] for r in listed]
    only = live.http.get("/v1/categories/widget/inspections.csv", params={"verdict": "unknown"}, headers=CLIENT)
    assert list(csv.DictReader(io.StringIO(only.text))) == []  # every widget answer had a threshold


@pytest.mark.parametrize("backend", BACKENDS)
def test_delete_by_age_removes_rows_and_kept_images(backend, request, tmp_path, tiny_backbone):
    url = backend_url(request, backend)
    with recording(tmp_path / "store", tiny_backbone, job_db=url, record_mode="thumbnails") as live:
        live.predict([11, 12], data={"part_id": "new"})
        live.drain()
        old = [_row(i, "2020-01-01T00:00:00.000000Z") for i in range(3)]
        live.records.inspections.insert(old)
        kept = [r for r in live.inspections().json()["inspections"] if r["part_id"] == "new"]
        files = [live.records.inspections.image_dir / r[k] for r in kept for k in ("image_path", "overlay_path")]
        assert len(files) == 4 and all(f.is_file() and f.stat().st_size > 0 for f in files)
        refused = live.http.delete("/v1/categories/widget/inspections", params={"before": "2021-01-01"},
                                   headers=CLIENT)
        assert refused.status_code == 403 and len(live.inspections().json()["inspections"]) == 5
        answer = live.http.delete("/v1/categories/widget/inspections", params={"before": "2021-01-01"},
                                  headers=ADMIN)
        assert answer.status_code == 200 and answer.json()["deleted"] == 3
        assert {r["part_id"] for r in live.inspections().json()["inspections"]} == {"new"}
        assert all(f.is_file() for f in files)  # newer than `before`: untouched
        future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
        answer = live.http.delete("/v1/categories/widget/inspections", params={"before": future}, headers=ADMIN)
        assert answer.json()["deleted"] == 2 and live.inspections().json()["inspections"] == []
        assert not any(f.exists() for f in files)
        missing = live.http.delete("/v1/categories/widget/inspections", headers=ADMIN)
        assert missing.status_code == 422 and missing.json()["error"]["code"] == "validation_error"
