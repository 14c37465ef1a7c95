"""The product page's read routes against a real server on loopback: the trend of the inspection record (on the
embedded SQLite file and on PostgreSQL) recomputed here from the recorded rows, its calibration reference from the
active version's stored evidence, stored shots as thumbnails of the right picture, and version pins."""

from __future__ import annotations

import io
import math
from collections import defaultdict
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from PIL import Image

from app.records.pages import time_text
from tests.helpers.predict import defect, good, png
from tests.helpers.records import ADMIN, CLIENT, backend_url, recording

BACKENDS = ["sqlite", "postgresql"]
TREND = "/v1/categories/widget/inspections/trend"


@pytest.fixture(params=BACKENDS)
def live(request, tmp_path, tiny_backbone):
    with recording(tmp_path / "store", tiny_backbone, job_db=backend_url(request, request.param)) as server:
        yield server


def _p95(values: list[float]) -> float | None:
    """Nearest rank, written out as its definition: the smallest value with at least 95 % at or below it."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[math.ceil(0.95 * len(ordered)) - 1]


def _expected(rows: list[dict], prefix: int) -> dict[str, dict]:
    """The trend's numbers per bucket, recomputed from the listed rows."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        groups[row["time"][:prefix]].append(row)
    out = {}
    for key, group in groups.items():
        scores = [r["score_normalized"] for r in group if r["score_normalized"] is not None]
        anomalous = sum(r["verdict"] == "anomalous" for r in group)
        normal = sum(r["verdict"] == "normal" for r in group)
        out[key] = {"inspections": len(group), "anomalous": anomalous, "normal": normal,
                    "anomalous_rate": anomalous / (anomalous + normal) if anomalous + normal else None,
                    "scored": len(scores), "score_mean": sum(scores) / len(scores) if scores else None,
                    "score_p95": _p95(scores), "score_max": max(scores) if scores else None}
    return out


def _assert_bucket(got: dict, want: dict) -> None:
    for field, value in want.items():
        if value is None or isinstance(value, int):
            assert got[field] == value, (field, got, want)
        else:
            assert got[field] == pytest.approx(value, rel=1e-9), (field, got, want)


def _old_rows(base: datetime) -> list[dict]:
    """Rows at chosen times across three hours (a live prediction cannot choose its time): 21 in the first hour
    so the 95th percentile is not the maximum (rank 20 of 21), one hour empty, one row without a threshold."""
    rows = []
    for i in range(30):
        hour = 0 if i < 21 else 2 if i < 29 else 3
        normalized = None if i == 29 else 0.37 + 0.113 * ((i * 7) % 30)
        verdict = "unknown" if normalized is None else "anomalous" if normalized > 1 else "normal"
        rows.append({"time": time_text(base + timedelta(hours=hour, minutes=i)), "category": "widget",
                     "version": 1, "score": normalized or 0.2, "score_normalized": normalized, "verdict": verdict,
                     "threshold": None if normalized is None else 1.0, "map_threshold": 0.5, "request_id": None,
                     "part_id": f"old-{i}", "line": "L1", "camera": None, "filename": None, "sha256": f"{i:064x}",
                     "image_bytes": 0, "replica": "test"})
    return rows


def test_trend_is_the_recorded_inspections_per_bucket(live):
    live.predict([20, 21, 22, 23])
    files = [("files", (f"d{s}.png", png(defect(s)), "image/png")) for s in (30, 31, 32)]
    assert live.http.post("/v1/categories/widget/predict", files=files, headers=CLIENT).status_code == 200
    live.drain()
    base = datetime(2024, 5, 1, 6, tzinfo=UTC)
    live.records.inspections.insert(_old_rows(base))
    rows = live.inspections(limit=1000).json()["inspections"]
    assert len(rows) == 7 + 30

    old = live.http.get(TREND, params={"since": "2024-05-01T06:00:00Z", "until": "2024-05-01T10:00:00Z"},
                        headers=CLIENT).json()
    assert (old["since"], old["until"], old["bucket"]) == ("2024-05-01T06:00:00.000000Z",
                                                           "2024-05-01T10:00:00.000000Z", "hour")
    want = _expected([r for r in rows if r["time"] < "2024-05-02"], 13)
    assert [b["start"][:13] for b in old["buckets"]] == [f"2024-05-01T{h:02d}" for h in range(6, 10)]
    for got in old["buckets"]:
        _assert_bucket(got, want.get(got["start"][:13], {"inspections": 0, "anomalous_rate": None,
                                                         "score_p95": None}))
    first = old["buckets"][0]
    assert first["score_p95"] < first["score_max"]  # rank 20 of 21: the percentile is not just the maximum
    assert old["buckets"][3]["anomalous"] + old["buckets"][3]["normal"] == old["buckets"][3]["inspections"] - 1

    recent = live.http.get(TREND, headers=CLIENT).json()  # default: the last 24 hours, the live answers in them
    assert len(recent["buckets"]) == 24
    fresh = _expected([r for r in rows if r["time"] >= "2024-05-02"], 13)
    by_start = {b["start"][:13]: b for b in recent["buckets"]}
    for key, value in fresh.items():
        _assert_bucket(by_start[key], value)
    assert sum(b["inspections"] for b in recent["buckets"]) == 7

    days = live.http.get(TREND, params={"bucket": "day", "since": "2024-04-30T12:00:00Z",
                                        "until": "2024-05-02T00:00:01Z"}, headers=CLIENT).json()
    assert (days["since"], days["until"]) == ("2024-04-30T00:00:00.000000Z", "2024-05-03T00:00:00.000000Z")
    want_days = _expected(rows, 10)  # rounded out to whole days: 30 April to 2 May
    for got in days["buckets"]:
        _assert_bucket(got, want_days.get(got["start"][:10], {"inspections": 0}))
    assert [b["inspections"] for b in days["buckets"]] == [0, 30, 0]
    this_month = live.http.get(TREND, params={"bucket": "day"}, headers=CLIENT).json()
    assert len(this_month["buckets"]) == 30
    for got in this_month["buckets"]:
        _assert_bucket(got, want_days.get(got["start"][:10], {"inspections": 0}))
    assert sum(b["inspections"] for b in this_month["buckets"]) == 7


def test_trend_reference_is_the_active_calibration_normalised(live):
    detail = live.http.get("/v1/categories/widget", headers=CLIENT).json()
    store = live.app.state.category_service.store
    calibration = store.manifest("widget", detail["active_version"]).adapter["calibration"]
    normal = [s / calibration["threshold"] for s in calibration["normal_scores"]]
    reference = live.http.get(TREND, headers=CLIENT).json()["reference"]
    assert reference["version"] == detail["active_version"]
    assert reference["threshold"] == pytest.approx(detail["decision"]["threshold"])
    assert reference["normal_scores"] == len(normal) > 0
    assert reference["score_mean"] == pytest.approx(sum(normal) / len(normal))
    assert reference["score_p95"] == pytest.approx(_p95(normal))
    assert reference["score_max"] == pytest.approx(max(normal))
    assert reference["expected_false_alarm_rate"] == detail["decision"]["expected_false_alarm_rate"]
    # The record outlives its product: the trend still answers, without a reference.
    assert live.http.delete("/v1/categories/widget", headers=ADMIN).status_code == 200
    after = live.http.get(TREND, headers=CLIENT)
    assert after.status_code == 200 and after.json()["reference"] is None


def test_trend_refuses_bad_ranges_with_the_error_shape(live):
    for params, status, code in (
            ({"since": "2024-05-02T00:00:00Z", "until": "2024-05-01T00:00:00Z"}, 400, "invalid_range"),
            ({"since": "2024-01-01T00:00:00Z", "until": "2024-03-01T00:00:00Z"}, 400, "invalid_range"),  # 1440 h
            ({"bucket": "week"}, 422, "validation_error"),
            ({"since": "yesterday"}, 422, "validation_error")):
        response = live.http.get(TREND, params=params, headers=CLIENT)
        assert (response.status_code, response.json()["error"]["code"]) == (status, code), params
    assert live.http.get(TREND).status_code == 401
    assert live.http.get("/v1/categories/Bad!/inspections/trend", headers=CLIENT).status_code == 400
    # The same two months by day fit the bound.
    assert live.http.get(TREND, params={"bucket": "day", "since": "2024-01-01T00:00:00Z",
                                        "until": "2024-03-01T00:00:00Z"}, headers=CLIENT).status_code == 200


def _picture(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "JPEG"
        return image.convert("RGB")


def _distance(a: Image.Image, b: Image.Image) -> float:
    """Mean absolute pixel difference of ``b`` resized to ``a``."""
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b.resize(a.size), dtype=np.float64)).mean())


def test_shot_thumbnails_show_each_stored_shot_small(tmp_path, tiny_backbone):
    with recording(tmp_path / "store", tiny_backbone, register=False) as live:
        # Large, wide shots of different seeds (the texture differs by its noise and, here, its colour shift).
        sources = {}
        for seed in range(3):
            image = good(seed, (320, 200)).point(lambda v, s=seed: min(255, v + 60 * s))
            sources[seed] = image
        files = [("files", (f"s{s}.png", png(img), "image/png")) for s, img in sources.items()]
        assert live.http.post("/v1/categories/wide/shots", files=files, data={"finetune": "false"},
                              headers=ADMIN).status_code == 201
        shots = live.http.get("/v1/categories/wide/shots", headers=CLIENT).json()["shots"]
        assert len(shots) == 3
        base = "/v1/categories/wide/shots"
        for shot in shots:
            response = live.http.get(f"{base}/{shot['sha256']}/thumbnail", params={"size": 64}, headers=CLIENT)
            assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
            thumb = _picture(response.content)
            assert thumb.size == (64, 40)  # longer side = size, the 320x200 aspect kept
            own = sources[int(shot["file_name"][1])]
            others = [img for s, img in sources.items() if img is not own]
            # Its own shot, not another: a JPEG of a 5x reduction differs from the source resized here by about 6
            # levels (two resamplings of the noise); the other shots sit 60 or 120 levels brighter (about 45+).
            assert _distance(thumb, own) < 15 < min(_distance(thumb, o) for o in others)
        default = live.http.get(f"{base}/{shots[0]['sha256']}/thumbnail", headers=CLIENT)
        assert max(_picture(default.content).size) == 256  # the default bound

        removed = shots[0]["sha256"]
        unknown = "f" * 64
        for sha, status, code in ((unknown, 404, "shot_not_found"), ("F" * 64, 400, "invalid_sha256")):
            response = live.http.get(f"{base}/{sha}/thumbnail", headers=CLIENT)
            assert (response.status_code, response.json()["error"]["code"]) == (status, code), sha
        assert live.http.get(f"{base}/{removed}/thumbnail", params={"size": 4096}, headers=CLIENT).status_code == 422
        assert live.http.get(f"{base}/{removed}/thumbnail").status_code == 401

        # A removed shot is no longer the product's (404); rolling back to the version that lists it shows it again.
        assert live.http.delete(f"{base}/{removed}", headers=ADMIN).status_code == 200
        assert live.http.get(f"{base}/{removed}/thumbnail", headers=CLIENT).status_code == 404
        assert live.http.post("/v1/categories/wide/versions/1/activate", headers=ADMIN).status_code == 200
        assert live.http.get(f"{base}/{removed}/thumbnail", headers=CLIENT).status_code == 200


def test_versions_say_which_are_pinned(live):
    def pinned() -> dict[int, bool | None]:
        detail = live.http.get("/v1/categories/widget", headers=CLIENT).json()
        return {v["version"]: v["pinned"] for v in detail["versions"]}

    assert live.http.put("/v1/categories/widget/threshold", json={"target_false_alarm_rate": 0.05},
                         headers=ADMIN).status_code == 200
    assert pinned() == {1: False, 2: False}
    assert live.http.put("/v1/categories/widget/versions/1/pin", headers=ADMIN).status_code == 200
    assert pinned() == {1: True, 2: False}
