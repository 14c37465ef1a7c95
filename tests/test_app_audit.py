"""The audit log and the record routes' keys, against a real server on loopback: every admin change is an event
with the key's configured (or derived) name and the versions before and after; previews and refused changes are
not; ``GET /v1/audit`` filters and pages; client keys read the record, only admin keys delete it or read the log."""

from __future__ import annotations

import pytest

from app.core.key_names import key_fingerprint
from tests.helpers.predict import good, png
from tests.helpers.records import CLIENT, backend_url, recording

ALICE = {"Authorization": "Bearer alice-key"}
BOB = {"Authorization": "Bearer bob-key"}


@pytest.fixture(params=["sqlite", "postgresql"])
def live(request, tmp_path, tiny_backbone):
    keys = '{"alice": "alice-key"}'  # bob-key is added unnamed below: its name is derived
    with recording(tmp_path / "store", tiny_backbone, job_db=backend_url(request, request.param), register=False,
                   admin_keys=keys) as server:
        server.app.state.settings.admin_keys = [*server.app.state.settings.admin_keys, "bob-key"]
        yield server


def shots(*seeds):
    return [("files", (f"s{s}.png", png(good(s)), "image/png")) for s in seeds]


def test_every_admin_change_is_an_event_with_the_keys_name_and_versions(live):
    http = live.http
    assert http.post("/v1/categories/widget/shots", files=shots(0, 1, 2, 3), data={"finetune": "false"},
                     headers=ALICE).status_code == 201
    assert http.post("/v1/categories/widget/shots", files=shots(4), headers=BOB).status_code == 201
    assert http.put("/v1/categories/widget/threshold", json={"threshold": 0.4}, params={"dry_run": "true"},
                    headers=ALICE).status_code == 200  # a preview: no event
    assert http.put("/v1/categories/widget/threshold", json={"threshold": 0.4}, headers=ALICE).status_code == 200
    assert http.post("/v1/categories/widget/versions/1/activate", headers=BOB).status_code == 200
    assert http.post("/v1/categories/widget/versions/9/activate", headers=BOB).status_code == 404  # no event
    assert http.delete("/v1/categories/widget/inspections", params={"before": "2020-01-01"},
                       headers=ALICE).status_code == 200
    assert http.delete("/v1/categories/widget", headers=ALICE).status_code == 200
    events = http.get("/v1/audit", headers=ALICE).json()["events"]
    bob = f"admin-{key_fingerprint('bob-key')[:8]}"
    assert [(e["action"], e["key_name"], e["before_version"], e["after_version"]) for e in reversed(events)] == [
        ("register", "alice", None, 1), ("shots_add", bob, 1, 2), ("threshold", "alice", 2, 3),
        ("rollback", bob, 3, 1), ("inspections_delete", "alice", 1, 1), ("delete", "alice", 1, None)]
    assert events[1]["detail"] == {"before": "2020-01-01"} and events[2]["detail"] == {"version": "1"}
    assert all(e["category"] == "widget" and e["scope"] == "admin" and e["request_id"] for e in events)
    assert "alice-key" not in str(events) and "bob-key" not in str(events)

    mine = http.get("/v1/audit", params={"key_name": bob}, headers=ALICE).json()["events"]
    assert [e["action"] for e in mine] == ["rollback", "shots_add"]
    walked, cursor = [], None
    while True:
        page = http.get("/v1/audit", params={"limit": 4, **({"cursor": cursor} if cursor else {})},
                        headers=ALICE).json()
        walked += [e["id"] for e in page["events"]]
        if (cursor := page["next_cursor"]) is None:
            break
    assert walked == [e["id"] for e in events]
    assert http.get("/v1/audit", params={"since": "2999-01-01"}, headers=ALICE).json()["events"] == []


NEW_ROUTES = [("GET", "/v1/categories/widget/inspections", "client"),
              ("GET", "/v1/categories/widget/inspections?format=csv", "client"),
              ("GET", "/v1/categories/widget/inspections.csv", "client"),
              ("DELETE", "/v1/categories/widget/inspections?before=2020-01-01", "admin"),
              ("GET", "/v1/audit", "admin")]


def test_the_record_routes_need_their_keys(live):
    for method, path, needs in NEW_ROUTES:
        anonymous = live.http.request(method, path)
        assert anonymous.status_code == 401 and anonymous.json()["error"]["code"], path
        wrong = live.http.request(method, path, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401, path
        as_client = live.http.request(method, path, headers=CLIENT)
        assert as_client.status_code == (200 if needs == "client" else 403), (path, as_client.text)
        assert live.http.request(method, path, headers=ALICE).status_code == 200, path
