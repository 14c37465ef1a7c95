"""Fine-tune jobs over real HTTP: 409 while one is active, cancel, promotion/hot swap, failure, metrics,
and persistence across an app restart. A scripted trainer (same protocol as ``FewShotTrainer``) makes
timing deterministic; the real trainer runs end to end in test_app_categories.py."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.jobs.job_store import INTERRUPTED_ERROR, JobStore
from app.main import create_app
from tests.helpers.jobs import ADMIN, Script, make_settings, register, shots, wait_state


def snapshot(root: Path) -> dict[str, str]:
    """Store content; a running writer's hold files (``.holds/``) are runtime state, not content."""
    return {str(p.relative_to(root)): "db" if p.name.startswith(("jobs.sqlite3", "records.sqlite3")) else
            hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file() and p.parent.name != ".holds"}


@pytest.fixture()
def store(tmp_path: Path) -> Path:
    return tmp_path / "store"


def start(store: Path, backbone, script: Script) -> TestClient:
    client = TestClient(create_app(make_settings(store), backbone=backbone))
    client.__enter__()
    script.store = client.app.state.store
    client.app.state.job_runner.trainer_factory = script
    return client


@pytest.mark.parametrize("promotable", [True, False])
def test_finished_job_saves_a_version_and_hot_swaps_only_when_promotable(store, tiny_backbone, promotable):
    script = Script(steps=3, promotable=promotable)
    client = start(store, tiny_backbone, script)
    cache = client.app.state.adapter_cache
    invalidated: list[str] = []
    original = cache.invalidate
    cache.invalidate = lambda c: (invalidated.append(c), original(c))[1]
    try:
        register(client, "widget")
        assert invalidated == ["widget"]
        r = client.post("/v1/categories/widget/finetune", headers=ADMIN, json={"steps": 3, "seed": 5})
        assert r.status_code == 202, r.text
        job = wait_state(client, r.json()["id"], {"succeeded", "failed", "cancelled"})
        assert job["state"] == "succeeded", job
        assert job["result_version"] == 2 and job["params"] == {"steps": 3, "seed": 5}
        assert (script.configs[0].steps, script.configs[0].seed, script.configs[0].seconds) == (3, 5, 120)
        assert job["metrics"]["auroc_finetuned"] == (0.9 if promotable else 0.4)
        detail = client.get("/v1/categories/widget", headers=ADMIN).json()
        assert detail["active_version"] == (2 if promotable else 1)
        assert detail["versions"][1]["promotable"] is promotable
        assert ("promoted" in job["message"]) is promotable
        assert invalidated == ["widget"] * (2 if promotable else 1)  # the hot swap drops the cached adapter
        if not promotable:
            assert "not promotable" in job["message"] and "memory adapter stays active" in job["message"]
        pred = client.post("/v1/categories/widget/predict?heatmap=none", headers=ADMIN, files=shots([9]))
        assert pred.json()["adapter_version"] == (2 if promotable else 1)
        metrics = client.get("/metrics").text
        assert 'clipshot_jobs{state="succeeded"} 1.0' in metrics
        assert 'clipshot_job_duration_seconds_count{state="succeeded"} 1.0' in metrics
    finally:
        client.__exit__(None, None, None)


def test_finetune_reuses_the_serving_memory_fit_as_its_baseline(store, tiny_backbone):
    """The memory-only baseline a fine-tune is compared with is the serving memory version (fitted on the same
    shots, defects and policy): the runner hands it to the trainer instead of having it fitted again on the
    device. A fine-tuned serving version is no such twin, so the next job's trainer fits its own."""
    script = Script(steps=1)
    client = start(store, tiny_backbone, script)
    try:
        register(client, "widget")
        served = client.app.state.store.manifest("widget").adapter["calibration"]
        for expected_version in (2, 3):
            r = client.post("/v1/categories/widget/finetune", headers=ADMIN, json={"steps": 1})
            assert r.status_code == 202, r.text
            job = wait_state(client, r.json()["id"], {"succeeded", "failed", "cancelled"})
            assert job["state"] == "succeeded" and job["result_version"] == expected_version, job
        first, second = script.baselines
        assert first is not None and first.lora is None
        assert first.calibration.to_dict() == served
        assert second is None  # version 2 (fine-tuned) serves now
    finally:
        client.__exit__(None, None, None)


def test_second_finetune_conflicts_and_cancel_writes_nothing(store, tiny_backbone):
    script = Script(steps=100_000, delay=0.02)
    client = start(store, tiny_backbone, script)
    try:
        register(client, "widget")
        register(client, "gear", [10, 11])
        first = client.post("/v1/categories/widget/finetune", headers=ADMIN).json()
        assert first["state"] == "queued" and first["params"] == {}
        assert script.started.wait(20)
        running = wait_state(client, first["id"], {"running"})
        again = client.post("/v1/categories/widget/finetune", headers=ADMIN)
        assert again.status_code == 409 and again.json()["error"]["code"] == "job_already_active"
        assert first["id"] in again.json()["error"]["message"]
        # Registering more shots while training still succeeds; the busy job is reported as a warning.
        r = client.post("/v1/categories/widget/shots", headers=ADMIN, files=shots([20]))
        assert r.status_code == 201 and r.json()["job_id"] is None and r.json()["version"] == 2
        assert any("fine-tune not started" in w for w in r.json()["warnings"])

        queued = client.post("/v1/categories/gear/finetune", headers=ADMIN).json()  # waits behind widget
        r = client.delete(f"/v1/jobs/{queued['id']}", headers=ADMIN)
        assert r.status_code == 200 and r.json()["state"] == "cancelled" and r.json()["started_at"] is None

        time.sleep(0.3)  # let it report some progress first
        progressed = client.get(f"/v1/jobs/{first['id']}", headers=ADMIN).json()
        assert progressed["step"] > 0 and 0 < progressed["progress"] < 1 and running["started_at"]
        before = snapshot(store)
        started = time.monotonic()
        r = client.delete(f"/v1/jobs/{first['id']}", headers=ADMIN)
        assert r.status_code == 200, r.text
        assert r.json()["state"] == "cancelled" and time.monotonic() - started < 5
        assert snapshot(store) == before  # no version written
        assert client.get("/v1/categories/widget", headers=ADMIN).json()["active_version"] == 2
        assert script.closed >= 1  # the temporary LoRA was released
        assert client.delete(f"/v1/jobs/{first['id']}", headers=ADMIN).status_code == 409  # already final

        listed = client.get("/v1/jobs", headers=ADMIN, params={"state": "cancelled"}).json()["jobs"]
        assert [j["id"] for j in listed] == [queued["id"], first["id"]]  # newest first
        assert [j["id"] for j in client.get("/v1/jobs?category=gear", headers=ADMIN).json()["jobs"]] == [queued["id"]]
        assert len(client.get("/v1/jobs?limit=1", headers=ADMIN).json()["jobs"]) == 1
        # A new job may start once the category is free again.
        assert client.post("/v1/categories/widget/finetune", headers=ADMIN).status_code == 202
        r = client.delete("/v1/categories/widget", headers=ADMIN)  # cancels that job first
        assert r.status_code == 200 and r.json()["cancelled_job_id"]
        assert client.get(f"/v1/jobs/{r.json()['cancelled_job_id']}", headers=ADMIN).json()["state"] == "cancelled"
        assert not (store / "categories" / "widget").exists()
    finally:
        client.__exit__(None, None, None)


def test_failing_job_is_marked_failed_with_the_error(store, tiny_backbone):
    script = Script(steps=5, fail_at=2)
    client = start(store, tiny_backbone, script)
    try:
        register(client, "widget")
        before = snapshot(store)
        job_id = client.post("/v1/categories/widget/finetune", headers=ADMIN).json()["id"]
        job = wait_state(client, job_id, {"succeeded", "failed", "cancelled"})
        assert job["state"] == "failed" and "boom at step 2" in job["error"]
        assert snapshot(store) == before
        assert 'clipshot_jobs{state="failed"} 1.0' in client.get("/metrics").text
    finally:
        client.__exit__(None, None, None)


def test_jobs_survive_a_restart_and_interrupted_ones_fail(store, tiny_backbone):
    script = Script(steps=2)
    client = start(store, tiny_backbone, script)
    try:
        register(client, "widget")
        register(client, "gear", [10, 11])
        done = client.post("/v1/categories/widget/finetune", headers=ADMIN).json()["id"]
        assert wait_state(client, done, {"succeeded", "failed"})["state"] == "succeeded"
        script.steps, script.delay = 100_000, 0.02
        script.started.clear()
        running = client.post("/v1/categories/widget/finetune", headers=ADMIN).json()["id"]
        assert script.started.wait(20)
        queued = client.post("/v1/categories/gear/finetune", headers=ADMIN).json()["id"]
    finally:
        stopping = time.monotonic()
        client.__exit__(None, None, None)
    assert time.monotonic() - stopping < 10  # stop() cancels the running job instead of waiting for it

    with JobStore(store) as jobs:  # a process that died mid-job leaves a "running" record behind
        crashed = jobs.create("other", "finetune", {})
        jobs.update(crashed.id, state="running")

    client = start(store, tiny_backbone, Script(steps=1))
    try:
        history = {j["id"]: j for j in client.get("/v1/jobs", headers=ADMIN).json()["jobs"]}
        assert set(history) == {done, running, queued, crashed.id}
        assert history[done]["state"] == "succeeded" and history[done]["result_version"] == 2
        for job_id in (running, queued):
            assert history[job_id]["state"] == "failed" and "service stopping" in history[job_id]["error"]
        assert history[crashed.id]["state"] == "failed" and history[crashed.id]["error"] == INTERRUPTED_ERROR
        assert client.get("/v1/categories/widget", headers=ADMIN).json()["versions"][-1]["version"] == 2
        again = client.post("/v1/categories/gear/finetune", headers=ADMIN).json()["id"]  # the new runner works
        assert wait_state(client, again, {"succeeded", "failed"})["state"] == "succeeded"
    finally:
        client.__exit__(None, None, None)
