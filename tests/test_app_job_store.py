"""JobStore contract on both databases (SQLite file, PostgreSQL): CRUD, the state machine, one active job per
category, persistence, restart recovery, exclusive claims, heartbeats, stale-worker reaping, remote cancel."""

from __future__ import annotations

import sqlite3
import threading
import time
import uuid

import pytest
from pydantic import ValidationError

from app.errors import ConflictError, NotFoundError
from app.jobs.job_store import (
    DB_FILENAME,
    INTERRUPTED_ERROR,
    InvalidTransitionError,
    Job,
    JobConflictError,
    JobDatabaseError,
    JobState,
    JobStore,
    StaleJobError,
)


@pytest.fixture(params=["sqlite", "postgres"])
def open_store(request, tmp_path):
    """Opens a new JobStore (a new connection, as another process would) on this test's database."""
    if request.param == "sqlite":
        return lambda: JobStore(tmp_path)
    url = request.getfixturevalue("postgres_url")
    return lambda: JobStore(url=url)


@pytest.fixture
def store(open_store):
    with open_store() as s:
        yield s


def test_sqlite_is_the_default_file_in_the_store(tmp_path):
    with JobStore(tmp_path) as s:
        assert not s.shared
        s.create("bottle")
    assert (tmp_path / DB_FILENAME).is_file()


def test_create_and_get(store):
    job = store.create("bottle", "finetune", {"steps": 50, "lr": 1e-3})
    assert uuid.UUID(job.id).version == 4
    assert (job.category, job.kind, job.state, job.progress) == ("bottle", "finetune", JobState.queued, 0.0)
    assert job.params == {"steps": 50, "lr": 1e-3}
    assert job.started_at is None and job.finished_at is None
    assert job.created_at.tzinfo is not None
    assert store.get(job.id) == job
    assert store.get(str(uuid.uuid4())) is None


def test_wal_mode(tmp_path):
    with JobStore(tmp_path) as store:
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


def test_persists_across_reopen(open_store):
    with open_store() as s:
        job = s.create("bottle", "finetune", {"steps": 5, "note": "ü"})
        job = s.update(job.id, state="running", progress=0.25, metrics={"auroc": [0.9, 0.95]})
    with open_store() as s:
        assert s.get(job.id) == job
        assert s.list() == [job]


def test_mark_interrupted_fails_active_jobs_only(open_store):
    with open_store() as s:
        queued = s.create("a", "finetune", {})
        running = s.update(s.create("b", "finetune", {}).id, state="running")
        done = s.create("c", "finetune", {})
        s.update(done.id, state="running")
        done = s.update(done.id, state="succeeded")
    with open_store() as s:  # "restart"
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


def test_claim_takes_the_oldest_queued_job_once(store):
    first, second = store.create("a"), store.create("b")
    claimed = store.claim_next("w1")
    assert claimed.id == first.id and claimed.state == JobState.running and claimed.worker == "w1"
    assert claimed.started_at is not None and claimed.message == "loading shots"
    assert store.claim_next("w2").id == second.id
    assert store.claim_next("w3") is None  # nothing queued any more
    assert store.get(first.id).worker == "w1"


def test_concurrent_claimers_each_get_distinct_jobs(open_store):
    """Workers with their own connections (as separate processes have) race for 12 jobs: each is run once."""
    with open_store() as s:
        ids = {s.create(f"cat{i}").id for i in range(12)}
    workers = 4
    stores = [open_store() for _ in range(workers)]
    start = threading.Barrier(workers)
    claims: list[list[str]] = [[] for _ in range(workers)]

    def work(i: int) -> None:
        start.wait()
        while (job := stores[i].claim_next(f"w{i}")) is not None:
            claims[i].append(job.id)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    taken = [job_id for c in claims for job_id in c]
    assert sorted(taken) == sorted(ids)  # every job once: no double claim, none lost
    for i, s in enumerate(stores):
        assert all(s.get(job_id).worker == f"w{i}" for job_id in claims[i])
        s.close()


def test_heartbeat_reports_ok_cancel_and_lost(store):
    assert store.claim_next("w1") is None
    store.create("a")
    job = store.claim_next("w1")
    assert store.heartbeat(job.id, "w1") == "ok"
    assert store.heartbeat(job.id, "w2") == "lost"  # not w2's job
    with pytest.raises(StaleJobError):
        store.request_cancel(store.create("b").id)  # queued: cancel it directly, not by flag
    store.request_cancel(job.id)
    assert store.get(job.id).message == "cancellation requested"
    assert store.heartbeat(job.id, "w1") == "cancel"
    store.update(job.id, state="cancelled")
    assert store.heartbeat(job.id, "w1") == "lost"


def test_reap_fails_only_jobs_without_a_recent_heartbeat(store):
    store.create("a")
    stale = store.claim_next("dead")
    store.create("b")
    alive = store.claim_next("alive")
    queued = store.create("c")
    time.sleep(0.3)
    assert store.heartbeat(alive.id, "alive") == "ok"
    assert store.reap_stale(0.2) == [stale.id]  # 0.2 s: the dead worker's last stamp is 0.3 s old, alive's fresh
    reaped = store.get(stale.id)
    assert reaped.state == JobState.failed and reaped.finished_at is not None
    assert reaped.error.startswith("interrupted: worker dead sent no heartbeat")
    assert store.get(alive.id).state == JobState.running
    assert store.get(queued.id).state == JobState.queued  # queued jobs wait for any worker
    assert store.heartbeat(stale.id, "dead") == "lost"  # a worker that was only slow learns it must stop
    assert store.reap_stale(0.2) == []


def test_update_with_expect_writes_nothing_when_the_state_moved(store):
    job = store.create("a")
    store.claim_next("w1")
    with pytest.raises(StaleJobError):
        store.update(job.id, expect=JobState.queued, state="cancelled")
    assert store.get(job.id).state == JobState.running


def test_sqlite_file_from_before_workers_is_upgraded(tmp_path):
    """A jobs.sqlite3 written by the previous release (no worker/heartbeat columns) opens and keeps its rows."""
    conn = sqlite3.connect(tmp_path / DB_FILENAME)
    conn.execute("CREATE TABLE jobs (id TEXT PRIMARY KEY, category TEXT NOT NULL, kind TEXT NOT NULL, "
                 "state TEXT NOT NULL, progress REAL NOT NULL DEFAULT 0, step INTEGER, total_steps INTEGER, "
                 "message TEXT, params TEXT NOT NULL DEFAULT '{}', metrics TEXT, error TEXT, result_version INTEGER, "
                 "created_at TEXT NOT NULL, started_at TEXT, finished_at TEXT)")
    conn.execute("INSERT INTO jobs (id, category, kind, state, created_at) VALUES "
                 "('old', 'a', 'finetune', 'queued', '2026-01-01T00:00:00.000000Z')")
    conn.commit()
    conn.close()
    with JobStore(tmp_path) as s:
        assert s.get("old").state == JobState.queued and s.get("old").worker is None
        assert s.claim_next("w1").id == "old"


def test_unreachable_postgres_is_one_line_error():
    with pytest.raises(JobDatabaseError) as info:
        JobStore(url="postgresql://clipshot:secret@127.0.0.1:1/jobs")  # port 1: nothing listens there
    message = str(info.value)
    assert "\n" not in message and "secret" not in message and "127.0.0.1:1" in message
