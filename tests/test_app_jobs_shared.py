"""Several replicas on one PostgreSQL job database and one store folder (the Ray / multi-machine layout):
a fine-tune posted to a serving-only replica runs on a worker replica, a cancel reaches the worker that runs the
job, a dead worker's job is failed by a live one, and a replica's restart leaves other workers' jobs alone."""

from __future__ import annotations

import io
import sys
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.cli.main import main
from app.jobs.job_store import JobStore
from app.main import create_app
from tests.helpers.jobs import ADMIN, Script, make_settings, register, shots, wait_state

STALE_S = 1.0  # workers beat every 0.25 s; 1 s keeps the tests short yet far above one beat


def start(store: Path, url: str, backbone, script: Script, *, worker: bool) -> TestClient:
    settings = make_settings(store).model_copy(update={"job_db": url, "job_worker": worker, "job_stale_s": STALE_S})
    client = TestClient(create_app(settings, backbone=backbone))
    client.__enter__()
    script.store = client.app.state.store
    runner = client.app.state.job_runner
    runner.trainer_factory, runner.poll_interval = script, 0.1
    return client


@pytest.fixture
def replicas(tmp_path, postgres_url, tiny_backbone):
    """``serving`` (job_worker=false) and ``worker`` (job_worker=true) sharing the job database and the store."""
    store = tmp_path / "store"
    scripts = {"serving": Script(), "worker": Script()}
    clients = {"serving": start(store, postgres_url, tiny_backbone, scripts["serving"], worker=False),
               "worker": start(store, postgres_url, tiny_backbone, scripts["worker"], worker=True)}
    yield clients, scripts
    for client in clients.values():
        client.__exit__(None, None, None)


def test_finetune_posted_to_a_serving_replica_runs_on_the_worker(replicas):
    clients, scripts = replicas
    serving, worker = clients["serving"], clients["worker"]
    register(serving, "widget")
    job = serving.post("/v1/categories/widget/finetune", headers=ADMIN).json()
    done = wait_state(serving, job["id"], {"succeeded", "failed"})
    assert done["state"] == "succeeded", done
    assert done["worker"] == worker.app.state.job_runner.worker_id  # claimed by the worker, not the poster
    assert scripts["serving"].configs == [] and len(scripts["worker"].configs) == 1
    versions = serving.get("/v1/categories/widget", headers=ADMIN).json()  # the store is shared
    assert versions["active_version"] == done["result_version"] == 2


def test_cancel_through_one_replica_stops_the_job_on_another(replicas):
    clients, scripts = replicas
    serving = clients["serving"]
    scripts["worker"].steps, scripts["worker"].delay = 100_000, 0.02
    register(serving, "widget")
    job_id = serving.post("/v1/categories/widget/finetune", headers=ADMIN).json()["id"]
    assert scripts["worker"].started.wait(20)
    asked = time.monotonic()
    assert serving.delete(f"/v1/jobs/{job_id}", headers=ADMIN).status_code == 200
    final = wait_state(serving, job_id, {"cancelled", "failed", "succeeded"})
    assert final["state"] == "cancelled", final
    assert time.monotonic() - asked < 5 * STALE_S  # the flag travels with the next heartbeat (every STALE_S / 4)
    assert serving.get("/v1/categories/widget", headers=ADMIN).json()["active_version"] == 1  # nothing written


def test_dead_workers_job_fails_and_a_restart_spares_live_jobs(tmp_path, postgres_url, tiny_backbone):
    with JobStore(url=postgres_url) as jobs:
        dead = jobs.create("gear")
        jobs.claim_next("crashed-host:1:abc")  # claimed, then its process died: no heartbeat ever again
    client = start(tmp_path / "store", postgres_url, tiny_backbone, Script(), worker=True)
    try:
        register(client, "widget")
        with JobStore(url=postgres_url) as jobs:
            waiting = jobs.create("widget")  # queued through another replica
        failed = wait_state(client, dead.id, {"failed", "succeeded", "cancelled"}, timeout=10 * STALE_S)
        assert failed["error"].startswith("interrupted: worker crashed-host:1:abc sent no heartbeat")
        ran = wait_state(client, waiting.id, {"succeeded", "failed"})  # queued jobs survive for any worker
        assert ran["state"] == "succeeded" and ran["worker"] == client.app.state.job_runner.worker_id
        with JobStore(url=postgres_url) as jobs:
            jobs.create("other")
            live = jobs.claim_next("live-host:2:def")
        second = start(tmp_path / "store", postgres_url, tiny_backbone, Script(), worker=False)  # a replica starts
        second.__exit__(None, None, None)  # ... and stops
        with JobStore(url=postgres_url) as jobs:
            assert jobs.get(live.id).state == "running"  # neither start nor stop touched a live worker's job
    finally:
        client.__exit__(None, None, None)


@pytest.mark.parametrize(("env", "expected_code", "must_mention"), [
    ({"CLIPSHOT_JOB_DB": "postgresql://clipshot:s3cret@127.0.0.1:1/jobs"},  # port 1: nothing listens
     1, ["cannot connect to the job database postgresql://clipshot:***@127.0.0.1:1/jobs", "CLIPSHOT_JOB_DB"]),
    ({"CLIPSHOT_JOB_DB": "mysql://db/jobs"}, 2, ["job_db must be empty", "postgresql://"]),
    ({"CLIPSHOT_JOB_WORKER": "false"}, 2, ["CLIPSHOT_JOB_WORKER=false needs a shared PostgreSQL CLIPSHOT_JOB_DB"]),
])
def test_bad_job_database_settings_stop_serve_with_one_message(monkeypatch, tmp_path, env, expected_code,
                                                               must_mention):
    monkeypatch.chdir(tmp_path)  # no stray .env
    # keys, not insecure-dev: the one line under test must be the first thing serve says (no no-auth warning)
    for name, value in {"CLIPSHOT_ADMIN_KEYS": "admin-key-0123456789", "CLIPSHOT_CLIENT_KEYS": "client-key-0123456789",
                        "CLIPSHOT_BACKBONE": "test:tiny-clip",
                        "CLIPSHOT_STORE": str(tmp_path / "store"), **env}.items():
        monkeypatch.setenv(name, value)
    stderr = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    started = time.monotonic()
    assert main(["serve", "--port", "1"]) == expected_code
    message = stderr.getvalue()
    assert message.startswith("clipshot serve: ") and "Traceback" not in message and "s3cret" not in message
    for text in must_mention:
        assert text in message
    assert time.monotonic() - started < 15  # fails fast: the connect timeout is 5 s, no model is loaded first


def test_an_activation_through_one_replica_is_served_by_the_other_at_once(replicas):
    """Every lookup reads the active pointer in the shared store (one small file), so the bound is 0 s plus the
    file system's own cache (a local folder here; see docs/deploy.md for NFS)."""
    clients, _ = replicas
    serving, worker = clients["serving"], clients["worker"]
    register(serving, "widget")
    register(worker, "widget", range(4, 8))  # v2, active
    image = shots([20])
    for version in (1, 2, 1):
        r = worker.post(f"/v1/categories/widget/versions/{version}/activate", headers=ADMIN)
        assert r.status_code == 200, r.text
        for client in (serving, worker):  # the very next request after activate answered, on either replica
            body = client.post("/v1/categories/widget/predict?heatmap=none", headers=ADMIN, files=image).json()
            assert body["adapter_version"] == version
