"""JobStore: CRUD, the state machine, one active job per category, persistence, restart recovery."""

from __future__ import annotations

import sqlite3
import threading
import uuid

import pytest
from pydantic import ValidationError

from app.errors import ConflictError, NotFoundError
from app.services.job_store import (
    DB_FILENAME,
    INTERRUPTED_ERROR,
    InvalidTransitionError,
    Job,
    JobConflictError,
    JobState,
    JobStore,
)


@pytest.fixture
def store(tmp_path):
    with JobStore(tmp_path) as s:
        yield s


def test_create_and_get(store, tmp_path):
    job = store.create("bottle", "finetune", {"steps": 50, "lr": 1e-3})
    assert uuid.UUID(job.id).version == 4
    assert (job.category, job.kind, job.state, job.progress) == ("bottle", "finetune", JobState.queued, 0.0)
    assert job.params == {"steps": 50, "lr": 1e-3}
    assert job.started_at is None and job.finished_at is None
    assert job.created_at.tzinfo is not None
    assert store.get(job.id) == job
    assert store.get(str(uuid.uuid4())) is None
    assert (tmp_path / DB_FILENAME).is_file()


def test_wal_mode(store):
    mode = sqlite3.connect(store.path).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_list_newest_first_with_filters(store):
    a = store.create("a", "finetune", {})
    store.update(a.id, state="running")
    store.update(a.id, state="succeeded", result_version=3)
    b = store.create("b", "finetune", {})
    a2 = store.create("a", "finetune", {})
    assert [j.id for j in store.list()] == [a2.id, b.id, a.id]
    assert [j.id for j in store.list(category="a")] == [a2.id, a.id]
    assert [j.id for j in store.list(state="queued")] == [a2.id, b.id]
    assert [j.id for j in store.list(category="a", state=JobState.succeeded)] == [a.id]
    assert [j.id for j in store.list(limit=1)] == [a2.id]
    with pytest.raises(ValueError):
        store.list(state="paused")
    with pytest.raises(ValueError):
        store.list(limit=0)


def test_update_happy_path_stamps_times(store):
    job = store.create("bottle", "finetune", {})
    running = store.update(job.id, state="running", total_steps=100, message="warming up")
    assert (
        running.state == JobState.running and running.started_at is not None and running.finished_at is None
    )
    mid = store.update(job.id, progress=0.5, step=50, message="training")
    assert (mid.progress, mid.step, mid.total_steps, mid.message) == (0.5, 50, 100, "training")
    assert mid.started_at == running.started_at
    done = store.update(job.id, state="succeeded", progress=1.0, metrics={"loss": 0.1}, result_version=2)
    assert done.finished_at is not None and done.finished_at >= done.started_at >= done.created_at
    assert store.get(job.id) == done
    assert done.metrics == {"loss": 0.1} and done.result_version == 2


@pytest.mark.parametrize(
    ("path", "bad"),
    [
        ([], "succeeded"),  # queued -> succeeded skips running
        (["running", "succeeded"], "running"),  # terminal is final
        (["running", "failed"], "queued"),
        (["cancelled"], "running"),
        (["running"], "queued"),  # no going back
    ],
)
def test_invalid_transitions_rejected(store, path, bad):
    job = store.create("bottle", "finetune", {})
    for state in path:
        store.update(job.id, state=state)
    before = store.get(job.id)
    with pytest.raises(InvalidTransitionError) as info:
        store.update(job.id, state=bad)
    assert isinstance(info.value, ConflictError) and info.value.status_code == 409
    assert store.get(job.id) == before  # nothing written


def test_finished_job_is_immutable(store):
    job = store.create("bottle", "finetune", {})
    store.update(job.id, state="cancelled")
    with pytest.raises(InvalidTransitionError):
        store.update(job.id, message="late progress report")


def test_update_validates_fields_and_ids(store):
    job = store.create("bottle", "finetune", {})
    with pytest.raises(ValidationError):
        store.update(job.id, progress=1.5)
    with pytest.raises(ValueError, match="cannot update"):
        store.update(job.id, category="other")
    with pytest.raises(ValueError):
        store.update(job.id, state="paused")
    with pytest.raises(NotFoundError):
        store.update(str(uuid.uuid4()), progress=0.1)
    assert store.get(job.id).progress == 0.0


def test_one_active_job_per_category(store):
    first = store.create("bottle", "finetune", {})
    assert store.active_for("bottle") == first
    assert store.active_for("screw") is None
    with pytest.raises(JobConflictError) as info:
        store.create("bottle", "finetune", {})
    assert info.value.status_code == 409 and info.value.active_job_id == first.id
    store.create("screw", "finetune", {})  # other categories are independent
    store.update(first.id, state="running")
    assert store.active_for("bottle").state == JobState.running
    store.update(first.id, state="failed", error="boom")
    assert store.active_for("bottle") is None
    assert store.create("bottle", "finetune", {}).state == JobState.queued


def test_concurrent_creates_admit_exactly_one(store):
    results: list[object] = []

    def attempt():
        try:
            results.append(store.create("bottle", "finetune", {}))
        except JobConflictError as e:
            results.append(e)

    threads = [threading.Thread(target=attempt) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(isinstance(r, Job) for r in results) == 1
    assert sum(isinstance(r, JobConflictError) for r in results) == 7


def test_persists_across_reopen(tmp_path):
    with JobStore(tmp_path) as s:
        job = s.create("bottle", "finetune", {"steps": 5, "note": "ü"})
        job = s.update(job.id, state="running", progress=0.25, metrics={"auroc": [0.9, 0.95]})
    with JobStore(tmp_path) as s:
        assert s.get(job.id) == job
        assert s.list() == [job]


def test_mark_interrupted_fails_active_jobs_only(tmp_path):
    with JobStore(tmp_path) as s:
        queued = s.create("a", "finetune", {})
        running = s.update(s.create("b", "finetune", {}).id, state="running")
        done = s.create("c", "finetune", {})
        s.update(done.id, state="running")
        done = s.update(done.id, state="succeeded")
    with JobStore(tmp_path) as s:  # "restart"
        assert sorted(s.mark_interrupted()) == sorted([queued.id, running.id])
        for job_id in (queued.id, running.id):
            job = s.get(job_id)
            assert job.state == JobState.failed and job.error == INTERRUPTED_ERROR
            assert job.finished_at is not None
        assert s.get(done.id) == done
        assert s.active_for("a") is None and s.active_for("b") is None
        assert s.mark_interrupted() == []
        assert s.count_by_state() == {
            JobState.queued: 0,
            JobState.running: 0,
            JobState.succeeded: 1,
            JobState.failed: 2,
            JobState.cancelled: 0,
        }


def test_job_serialises_as_api_schema(store):
    job = store.create("bottle", "finetune", {"steps": 1})
    data = job.model_dump(mode="json")
    assert data["state"] == "queued" and data["kind"] == "finetune"
    assert set(Job.model_json_schema()["properties"]) >= {
        "id",
        "state",
        "progress",
        "error",
        "result_version",
    }
