"""Registration, feedback and shot removal as jobs (``wait=false``): 202 with a job whose progress comes from the
fit's own chunks, the same answer as the synchronous call, bad input refused before any job exists, never queued
behind a fine-tune, and never left "running" by a restart. Real HTTP on loopback, tiny CLIP, real SQLite."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import httpx
import pytest
from threaded_server import threaded_server

from app.client import Client, FeedbackResult
from app.core.config import Settings
from app.jobs.job_store import Job, JobState, JobStore
from app.main import create_app
from app.schemas import ShotsRegistered
from tests.helpers.jobs import image_bytes, shots
from tests.test_app_edit_conflicts import GatedTrainer
from training.progress import Progress

ADMIN = {"Authorization": "Bearer admin-key"}
WAIT_S = 120.0  # generous bound for one refit on a 2-core box shared with other test runs
TERMINAL = ("succeeded", "failed", "cancelled")


class PacedTrainer(GatedTrainer):
    """``GatedTrainer`` whose training goes on in short steps (10 ms each, one device task per step, as a real
    fine-tune's) until released, instead of holding the device in one step: a long fine-tune that shares it."""

    def __call__(self, detector, images, **kwargs):
        trainer = super().__call__(detector, images, **kwargs)
        gate = self

        def steps():
            gate.started.set()
            step = 0
            while not gate.release.is_set():
                time.sleep(0.01)
                step += 1
                yield Progress("train", step, 10_000, loss=0.5, elapsed=0.01 * step)

        trainer.steps = steps
        return trainer


def settings(store: Path) -> Settings:
    return Settings(_env_file=None, backbone="test:tiny-clip", device="cpu", store=store, admin_keys=["admin-key"],
                    max_shots=16, finetune_steps=3, finetune_seconds=120)


@pytest.fixture()
def served(tmp_path, tiny_backbone):
    """A real server on loopback (gated fine-tune trainer) and an admin client; refit progress is written every
    10 ms so a poller sees the stages of a fit that takes about a second here."""
    app = create_app(settings(tmp_path / "store"), backbone=tiny_backbone)
    gate = PacedTrainer()
    with threaded_server(app.state.settings, app=app) as base, \
            httpx.Client(base_url=base, headers=ADMIN, timeout=WAIT_S) as client:
        gate.store = app.state.store
        app.state.job_runner.trainer_factory = gate
        app.state.refit_jobs.interval = 0.01
        yield client, gate, app


def follow(client: httpx.Client, job_id: str) -> tuple[dict, list[dict]]:
    """Poll the job until it is final; returns the final record and every record seen on the way."""
    seen: list[dict] = []
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        seen.append(job)
        if job["state"] in TERMINAL:
            return job, seen
        time.sleep(0.005)
    raise AssertionError(f"job {job_id} did not finish: {seen[-1]}")


def same_answer(job_result: dict, sync: dict) -> None:
    """The job's result is the synchronous body, up to the product's name (the twins are two products)."""
    drop = {"category", "job_id"}
    a = {k: v for k, v in job_result.items() if k not in drop}
    b = {k: v for k, v in sync.items() if k not in drop}
    assert a == b


def test_registration_job_reports_the_fits_progress_and_answers_what_the_synchronous_call_does(served):
    client, _, _ = served
    seeds = range(16)  # 16 shots: several feature batches and 16 leave-one-out folds, about a second of fit
    sync = client.post("/v1/categories/twin/shots", files=shots(seeds), data={"finetune": "false"})
    assert sync.status_code == 201, sync.text

    r = client.post("/v1/categories/widget/shots?wait=false", files=shots(seeds), data={"finetune": "false"})
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["kind"] == "register" and job["category"] == "widget" and job["state"] in ("queued", "running")
    assert r.headers["location"] == f"/v1/jobs/{job['id']}"
    final, seen = follow(client, job["id"])

    assert final["state"] == "succeeded", final
    same_answer(final["result"], sync.json())  # same shots -> same threshold, decision, geometry, warnings
    assert final["result_version"] == final["result"]["version"] == 1
    assert final["progress"] == 1.0 and final["stage"] == "done"
    # rising: the bar never goes back, and the poller saw it between 0 and 1 at more than one point of the fit
    bars = [j["progress"] for j in seen]
    assert bars == sorted(bars), bars
    assert len({(j["stage"], j["step"]) for j in seen if 0 < j["progress"] < 1}) >= 2, seen
    assert all(j["step"] <= j["total_steps"] for j in seen if j["stage"] not in (None, "done"))
    # reaching done/total: every stage the fit announced ran to its end, counted by the fit's own chunks
    stages = {s["name"]: s for s in final["metrics"]["stages"]}
    assert stages["embedding shots"]["total"] == 16 and stages["leave-one-out calibration"]["total"] >= 16
    assert [s for s in final["metrics"]["stages"] if s["done"] != s["total"]] == []
    listed = client.get("/v1/jobs", params={"category": "widget"}).json()["jobs"]
    assert [(j["id"], j["kind"]) for j in listed] == [(job["id"], "register")]
    assert client.get("/v1/categories/widget").json()["active_version"] == 1


def test_feedback_and_shot_removal_jobs_answer_what_the_synchronous_calls_do(served):
    client, _, _ = served
    for name in ("twin", "widget"):
        assert client.post(f"/v1/categories/{name}/shots", files=shots(range(4)),
                           data={"finetune": "false"}).status_code == 201
    confirmed = shots([40, 41])
    sync = client.post("/v1/categories/twin/feedback", files=confirmed, data={"label": "good"})
    assert sync.status_code == 201, sync.text
    r = client.post("/v1/categories/widget/feedback?wait=false", files=confirmed, data={"label": "good"})
    assert r.status_code == 202 and r.json()["kind"] == "feedback", r.text
    final, _ = follow(client, r.json()["id"])
    assert final["state"] == "succeeded", final
    same_answer(final["result"], sync.json())

    sha = client.get("/v1/categories/twin/shots").json()["shots"][0]["sha256"]
    sync = client.delete(f"/v1/categories/twin/shots/{sha}")
    assert sync.status_code == 200, sync.text
    r = client.delete(f"/v1/categories/widget/shots/{sha}?wait=false")
    assert r.status_code == 202 and r.json()["kind"] == "remove_shot", r.text
    final, _ = follow(client, r.json()["id"])
    assert final["state"] == "succeeded", final
    same_answer(final["result"], sync.json())


def test_bad_input_is_refused_before_any_job_exists(served):
    client, _, app = served
    r = client.post("/v1/categories/widget/shots?wait=false", data={"finetune": "false"},
                    files=[*shots(range(3)), ("files", ("broken.png", b"not an image", "image/png"))])
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_image", r.text
    assert "broken.png" in r.json()["error"]["message"]
    assert client.get("/v1/jobs").json()["jobs"] == []
    assert not app.state.store.categories()  # nothing stored

    assert client.post("/v1/categories/widget/shots", files=shots(range(4)),
                       data={"finetune": "false"}).status_code == 201
    refused = [
        client.post("/v1/categories/widget/feedback?wait=false", files=shots([40]), data={"label": "bad"}),
        client.post("/v1/categories/widget/feedback?wait=false", data={"label": "good"},
                    files=[("files", ("x.png", b"\x89PNG broken", "image/png"))]),
        client.post("/v1/categories/nowhere/feedback?wait=false", files=shots([40]), data={"label": "good"}),
        client.post("/v1/categories/widget/feedback?wait=false", files=shots([0]), data={"label": "defect"}),
        client.delete(f"/v1/categories/widget/shots/{'0' * 64}?wait=false"),
    ]
    assert [x.status_code for x in refused] == [400, 415, 404, 409, 404], [x.text for x in refused]
    assert [x.json()["error"]["code"] for x in refused] == [
        "invalid_label", "unsupported_image", "category_not_found", "label_conflict", "shot_not_found"]
    assert client.get("/v1/jobs").json()["jobs"] == []
    assert client.get("/v1/categories/widget").json()["active_version"] == 1
    # the same route takes good input as a job: the refusals above came from the job path's own checks
    ok = client.post("/v1/categories/widget/feedback?wait=false", files=shots([40]), data={"label": "good"})
    assert ok.status_code == 202, ok.text
    assert [j["id"] for j in client.get("/v1/jobs").json()["jobs"]] == [ok.json()["id"]]
    assert follow(client, ok.json()["id"])[0]["state"] == "succeeded"


def test_a_refit_job_does_not_wait_behind_a_finetune_and_two_refits_take_turns(served):
    client, gate, _ = served
    assert client.post("/v1/categories/widget/shots", files=shots(range(4)),
                       data={"finetune": "false"}).status_code == 201
    r = client.post("/v1/categories/widget/finetune", json={})
    assert r.status_code == 202, r.text
    finetune = r.json()["id"]
    assert gate.started.wait(WAIT_S), "the fine-tune never started"
    try:  # the fine-tune holds the device worker's train queue at its first step until released
        first = client.post("/v1/categories/widget/feedback?wait=false", files=shots([40]), data={"label": "good"})
        second = client.post("/v1/categories/widget/shots?wait=false", files=shots([50]),
                             data={"finetune": "false"})
        assert first.status_code == second.status_code == 202, (first.text, second.text)
        done = [follow(client, x.json()["id"])[0] for x in (first, second)]
        assert [j["state"] for j in done] == ["succeeded", "succeeded"], done
        tune = client.get(f"/v1/jobs/{finetune}").json()
        assert tune["state"] == "running", tune  # still held: nobody waited on it
        # one after the other on the product's lock: each made its own version from the one before
        assert [j["result"]["version"] for j in done] == [2, 3]
        assert done[1]["result"]["shots"] == 6  # 4 registered + 1 confirmed good + 1 added
    finally:
        gate.release.set()
    assert follow(client, finetune)[0]["state"] == "succeeded"


def test_a_queued_refit_can_be_cancelled_and_a_fitting_one_cannot(served):
    client, _, _ = served
    slow = client.post("/v1/categories/widget/shots?wait=false", files=shots(range(100, 116)),
                       data={"finetune": "false"})
    assert slow.status_code == 202, slow.text
    deadline = time.monotonic() + WAIT_S
    while client.get(f"/v1/jobs/{slow.json()['id']}").json()["state"] != "running":  # it holds the product now
        assert time.monotonic() < deadline
        time.sleep(0.002)
    queued = client.post("/v1/categories/widget/shots?wait=false", files=shots([40]), data={"finetune": "false"})
    assert queued.status_code == 202 and queued.json()["state"] == "queued", queued.text
    r = client.delete(f"/v1/jobs/{queued.json()['id']}")
    assert r.status_code == 200 and r.json()["state"] == "cancelled", r.text
    r = client.delete(f"/v1/jobs/{slow.json()['id']}")  # a 16-shot fit still runs (about a second here)
    assert r.status_code == 409 and r.json()["error"]["code"] == "job_not_cancellable", r.text
    assert follow(client, slow.json()["id"])[0]["state"] == "succeeded"
    assert client.get(f"/v1/jobs/{queued.json()['id']}").json()["state"] == "cancelled"
    detail = client.get("/v1/categories/widget").json()
    assert detail["active_version"] == 1 and detail["shots"] == 16  # the cancelled one stored and made nothing


def test_a_refit_cut_off_by_a_restart_ends_failed_with_its_reason(tmp_path, tiny_backbone):
    store = tmp_path / "store"
    with JobStore(store) as jobs:  # what a process killed mid-refit leaves: a claimed, running record
        job = jobs.create("widget", "register", {"images": 4})
        jobs.claim(job.id, "gone:1:refit", "fitting")
        tune = jobs.create("widget", "finetune", {})
    app = create_app(settings(store), backbone=tiny_backbone)
    with threaded_server(app.state.settings, app=app) as base, \
            httpx.Client(base_url=base, headers=ADMIN, timeout=WAIT_S) as client:
        refit = client.get(f"/v1/jobs/{job.id}").json()
        assert refit["state"] == "failed" and "before the refit finished" in refit["error"], refit
        assert "GET /v1/categories/widget" in refit["error"]  # where to look whether a version was made
        assert "finetune" in client.get(f"/v1/jobs/{tune.id}").json()["message"]  # fine-tunes keep their own


def test_an_old_job_table_takes_refit_kinds_and_keeps_its_rows(tmp_path):
    """A jobs.sqlite3 from before the refit kinds (CHECK kind IN ('finetune'), one active job of any kind per
    category) is rebuilt on open: its rows stay, in order, and refits run beside an active fine-tune."""
    path = tmp_path / "jobs.sqlite3"
    conn = sqlite3.connect(path)
    conn.executescript("""
        CREATE TABLE jobs (id TEXT PRIMARY KEY, category TEXT NOT NULL,
            kind TEXT NOT NULL CHECK (kind IN ('finetune')), state TEXT NOT NULL, progress REAL NOT NULL DEFAULT 0,
            step INTEGER, total_steps INTEGER, message TEXT, params TEXT NOT NULL DEFAULT '{}', metrics TEXT,
            error TEXT, result_version INTEGER, created_at TEXT NOT NULL, started_at TEXT, finished_at TEXT);
        CREATE UNIQUE INDEX jobs_one_active_per_category ON jobs (category) WHERE state IN ('queued', 'running');
        INSERT INTO jobs (id, category, kind, state, created_at) VALUES
            ('a', 'widget', 'finetune', 'succeeded', '2024-01-01T00:00:00.000000Z'),
            ('b', 'widget', 'finetune', 'queued', '2024-01-01T00:00:01.000000Z');
    """)
    conn.close()
    with JobStore(tmp_path) as jobs:
        assert [j.id for j in jobs.list()] == ["b", "a"]
        refit = jobs.create("widget", "feedback", {"images": 1})  # beside the queued fine-tune 'b'
        assert jobs.active_for("widget").id == "b"  # the active fine-tune, as before
        assert jobs.claim_next("w").id == "b"  # the runner claims fine-tunes only
        assert jobs.claim_next("w") is None
        done = jobs.update(jobs.claim(refit.id, "w", "fitting").id, state=JobState.succeeded,
                           result={"version": 2}, stage="done")
        assert done.result == {"version": 2} and done.stage == "done"


def test_the_python_client_can_start_a_refit_and_follow_it(served):
    client, _, _ = served
    with Client(str(client.base_url).rstrip("/"), "admin-key") as api:
        job = api.register("widget", [image_bytes(s) for s in range(4)], finetune=False, wait=False)
        assert isinstance(job, Job) and job.kind == "register"
        stages: list[str | None] = []
        done = api.wait_job(job.id, timeout=WAIT_S, poll_s=0.01, progress=lambda j: stages.append(j.stage))
        assert done.state == JobState.succeeded and done.result is not None
        assert ShotsRegistered.model_validate(done.result).version == 1 and stages[-1] == "done"
        job = api.feedback("widget", [image_bytes(40)], "good", wait=False)
        done = api.wait_job(job.id, timeout=WAIT_S, poll_s=0.01)
        assert done.kind == "feedback" and FeedbackResult.model_validate(done.result).version == 2
        assert api.feedback("widget", [image_bytes(41)], "good").version == 3  # the default still waits
