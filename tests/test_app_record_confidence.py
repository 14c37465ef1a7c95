"""The record keeps each verdict's confidence as the answer gave it, lists the unsure ones, and an older record
database gains the columns on start-up without losing its rows (embedded SQLite and PostgreSQL)."""

from __future__ import annotations

import csv
import io

import pytest

from app.records import record_db
from app.records.inspections import InspectionStore
from tests.helpers.records import backend_url, recording

BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture(params=BACKENDS)
def live(request, tmp_path, tiny_backbone):
    with recording(tmp_path / "store", tiny_backbone, job_db=backend_url(request, request.param)) as server:
        yield server


def test_each_row_carries_the_answers_confidence_and_unsure_ones_can_be_listed(live):
    answer = live.predict([21, 22, 23, 24]).json()["predictions"]
    live.drain()
    rows = {r["sha256"]: r for r in live.inspections().json()["inspections"]}
    for pred in answer:
        confidence, row = pred["confidence"], rows[pred["sha256"]]
        assert confidence is not None  # 4 shots: every answer has a verdict, so a confidence
        assert row["p_value"] == pytest.approx(confidence["p_value"])
        assert row["good_p_value"] == pytest.approx(confidence["good_p_value"])
        assert row["defect_p_value"] == (pytest.approx(confidence["defect_p_value"])
                                         if confidence["defect_p_value"] is not None else None)
        assert row["defect_evidence"] == confidence["defect_evidence"]
    # The bar is the median of what was answered, so the filter has rows on both sides of it to tell apart.
    p_values = sorted(p["confidence"]["p_value"] for p in answer)
    bar = p_values[len(p_values) // 2]
    unsure = {r["sha256"] for r in live.inspections(min_p_value=bar).json()["inspections"]}
    assert unsure == {p["sha256"] for p in answer if p["confidence"]["p_value"] >= bar}
    assert live.inspections(min_p_value=1.5).status_code == 422
    table = list(csv.DictReader(io.StringIO(live.inspections(format="csv").text)))
    assert {r["sha256"]: float(r["p_value"]) for r in table} == pytest.approx(
        {p["sha256"]: p["confidence"]["p_value"] for p in answer})


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_record_from_before_confidences_is_migrated_in_place(backend, request, tmp_path, monkeypatch):
    url = backend_url(request, backend)
    first = record_db.MIGRATIONS[:1]
    with monkeypatch.context() as old:  # the record as the previous release created it
        old.setattr(record_db, "MIGRATIONS", first)
        old.setattr(record_db, "LATEST", 1)
        db = record_db.open_record_database(tmp_path, url)
        with db.tx() as tx:
            tx.run("INSERT INTO inspections (time, category, score, verdict, sha256) VALUES (?, ?, ?, ?, ?)",
                   ("2026-01-01T00:00:00.000000Z", "widget", 0.4, "normal", "a" * 64))
        db.close()
    db = record_db.open_record_database(tmp_path, url)
    try:
        with db.tx() as tx:
            assert tx.one("SELECT version FROM schema_version WHERE component = 'records'")["version"] == \
                record_db.LATEST
        store = InspectionStore(db, tmp_path / "images")
        store.insert([{"time": "2026-01-02T00:00:00.000000Z", "category": "widget", "score": 0.9,
                       "verdict": "anomalous", "sha256": "b" * 64, "image_bytes": 0, "p_value": 0.2,
                       "good_p_value": 0.2, "defect_p_value": 0.5, "defect_evidence": "synthetic"}])
        with db.tx() as tx:
            rows = tx.all("SELECT sha256, p_value, defect_evidence FROM inspections ORDER BY time")
        assert rows == [{"sha256": "a" * 64, "p_value": None, "defect_evidence": None},
                        {"sha256": "b" * 64, "p_value": 0.2, "defect_evidence": "synthetic"}]
    finally:
        db.close()
