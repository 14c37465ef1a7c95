"""The score distributions behind a product's decision and the threshold preview on recorded traffic, over real
HTTP on loopback (tiny random CLIP, the record in SQLite and PostgreSQL): every number is recomputed here from the
stored bundle and the record, so the route must hand out exactly what the decision rests on."""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers.decisions import manifest
from tests.helpers.predict import defect, png
from tests.helpers.records import ADMIN, CLIENT, backend_url, recording

BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture(params=BACKENDS)
def live(request, tmp_path, tiny_backbone):
    with recording(tmp_path / "store", tiny_backbone, job_db=backend_url(request, request.param)) as server:
        yield server


def scores(live, category="widget", headers=CLIENT, **params):
    return live.http.get(f"/v1/categories/{category}/scores", params=params, headers=headers)


def calibration(live, version: int) -> dict:
    return manifest(live.records.settings.store, "widget", version)["adapter"]["calibration"]


def split(cal: dict) -> tuple[list[float], list[float]]:
    """(shots' scores, confirmed goods' scores): ``normal_scores`` holds each good image's own score and its light
    views' in image order, the same number per image; ``confirmed`` lists the confirmed images' indices."""
    groups = np.array_split(np.asarray(cal["normal_scores"]), cal["shots"])
    confirmed = set(cal["confirmed"])
    return ([float(s) for i, g in enumerate(groups) if i not in confirmed for s in g],
            [float(s) for i, g in enumerate(groups) if i in confirmed for s in g])


def preview(live, threshold: float):
    return live.http.put("/v1/categories/widget/threshold", json={"threshold": threshold},
                         params={"dry_run": "true"}, headers=ADMIN)


def test_scores_are_the_bundles_evidence_and_the_records_of_its_model(live):
    answers = [p for r in (live.predict([11, 12, 13]), live.predict([14, 15])) for p in r.json()["predictions"]]
    live.drain()
    body = scores(live).json()
    cal = calibration(live, 1)
    normal, confirmed = split(cal)
    assert body["normal"] == normal == cal["normal_scores"] and confirmed == []  # registration: shots only
    assert body["synthetic_defects"] == cal["defect_scores"] and len(body["synthetic_defects"]) > 0
    assert body["confirmed_goods"] == body["confirmed_defects"] == []
    assert (body["version"], body["good_images"], body["defect_evidence"]) == (1, cal["shots"], "synthetic")
    assert body["decision"]["threshold"] == cal["threshold"]
    # newest first: the second request's images, then the first's (one request's rows share a time stamp)
    assert sorted(body["recorded"]) == sorted(p["score"] for p in answers) and body["recorded_versions"] == [1]
    assert set(body["recorded"][:2]) == {p["score"] for p in answers[3:]}
    assert len(scores(live, recorded=2).json()["recorded"]) == 2
    assert scores(live, recorded=0).json()["recorded"] == []

    # A threshold change is the same model: its inspections, and the earlier ones, stay comparable.
    moved = live.http.put("/v1/categories/widget/threshold", json={"threshold": 0.5}, headers=ADMIN)
    assert moved.status_code == 200, moved.text
    live.predict([16])
    live.drain()
    moved = scores(live).json()
    assert (moved["version"], moved["recorded_versions"], len(moved["recorded"])) == (2, [1, 2], 6)
    assert moved["decision"]["threshold"] == 0.5 and moved["normal"] == normal

    # Feedback re-fits the memory: a new model, whose scores the old records do not share.
    good_one = live.http.post("/v1/categories/widget/feedback", headers=ADMIN, data={"label": "good"},
                              files=[("files", ("g.png", png(defect(30)), "image/png"))])
    bad_one = live.http.post("/v1/categories/widget/feedback", headers=ADMIN, data={"label": "defect"},
                             files=[("files", ("d.png", png(defect(31)), "image/png"))])
    assert good_one.status_code == bad_one.status_code == 201, (good_one.text, bad_one.text)
    refit = scores(live).json()
    cal = calibration(live, refit["version"])
    normal, confirmed = split(cal)
    assert cal["confirmed"] == [4] and len(confirmed) * 4 == len(normal) > 0  # 4 shots + 1 confirmed good, alike
    assert (refit["normal"], refit["confirmed_goods"]) == (normal, confirmed)
    assert refit["confirmed_defects"] == cal["validation_defect_scores"] and len(refit["confirmed_defects"]) == 1
    assert refit["defect_evidence"] == "confirmed" and refit["good_images"] == cal["shots"] == 5
    # The good part re-fitted the memory (v3); the confirmed defect only joined the validation set (v4, same model).
    assert refit["recorded_versions"] == [3, 4] and refit["version"] == 4 and refit["recorded"] == []


def test_preview_counts_the_recorded_scores_now_and_under_the_candidate(live):
    live.predict(range(20, 28))
    live.predict([40], category="widget")
    live.drain()
    recorded = [r["score"] for r in live.inspections(limit=1000).json()["inspections"]]
    now = scores(live).json()["decision"]["threshold"]
    candidate = float(np.median(recorded))  # half the traffic above: the share must move visibly
    answer = preview(live, candidate)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["dry_run"] is True and body["version"] == 1 and body["decision"]["threshold"] == candidate
    effect = body["recorded"]
    expected_now = sum(s > now for s in recorded)
    expected = sum(s > candidate for s in recorded)
    assert effect == {"inspections": 9, "versions": [1], "threshold_now": now, "flagged_now": expected_now,
                      "flagged": expected, "share_now": pytest.approx(expected_now / 9),
                      "share": pytest.approx(expected / 9)}
    assert scores(live).json()["version"] == 1  # a preview changes nothing
    applied = live.http.put("/v1/categories/widget/threshold", json={"threshold": candidate}, headers=ADMIN).json()
    assert applied["version"] == 2 and applied["recorded"] is None  # only a preview counts the record
    again = preview(live, candidate).json()["recorded"]  # the new rule serves now: both counts agree
    assert (again["threshold_now"], again["flagged_now"], again["versions"]) == (candidate, expected, [1, 2])


def test_without_records_the_shares_are_null(live):
    effect = preview(live, 0.2).json()["recorded"]
    assert effect["inspections"] == 0 and effect["share"] is None and effect["share_now"] is None
    assert scores(live).json()["recorded"] == []


def test_scores_errors_and_keys(live):
    for category, params, status, code in (("nope", {}, 404, "category_not_found"),
                                           ("Bad Name!", {}, 400, "invalid_category"),
                                           ("widget", {"recorded": 10_001}, 422, "validation_error"),
                                           ("widget", {"recorded": -1}, 422, "validation_error")):
        response = scores(live, category, **params)
        assert response.status_code == status and response.json()["error"]["code"] == code, response.text
    assert scores(live, headers={}).status_code == 401
    assert scores(live, headers=ADMIN).status_code == 200  # admin keys read too

    store = live.app.state.category_service.store
    adapter = {k: v for k, v in store.manifest("widget").adapter.items() if k != "calibration"}
    store.derive("widget", 1, {"adapter": adapter})  # a version that stores no evidence (as bundles once did)
    response = scores(live)
    assert response.status_code == 409 and response.json()["error"]["code"] == "no_calibration"
    (live.records.settings.store / "categories" / "widget" / "active.json").unlink()
    response = scores(live)
    assert response.status_code == 409 and response.json()["error"]["code"] == "no_active_version"
