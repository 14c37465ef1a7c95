"""Durable records of background jobs (fine-tunes): SQLite in the store by default, PostgreSQL when shared.

Why durable: clients poll a job id across restarts, and jobs cut off by a restart or a dead worker must be
reported as failed rather than "running" forever. The rows live where ``app.jobs.job_db`` says (a SQLite
file for one process, PostgreSQL for several replicas / workers); the rules live here, in one SQL text, so
every caller and both databases get the same contract (``tests/test_app_job_store.py`` runs on both):

* state machine: queued -> running | failed | cancelled; running -> succeeded | failed | cancelled;
  terminal states (succeeded, failed, cancelled) are final and the record is then immutable;
* at most one active (queued or running) fine-tune per category, enforced by a partial UNIQUE index, so two
  concurrent requests cannot both start a fine-tune (the loser gets ``JobConflictError`` = 409); refit jobs
  (register, feedback, remove_shot) are not limited: they wait for the category's lock like the synchronous call;
* a queued fine-tune is claimed by exactly one worker (``claim_next``: ``FOR UPDATE SKIP LOCKED`` on PostgreSQL,
  the database write lock on SQLite); a refit job is claimed by id by the process that accepted it (``claim``);
  the claimer stamps a heartbeat while it runs, and a job whose heartbeat is older than the stale limit is
  failed by any worker (``reap_stale``), as a restart fails a local one;
* cancellation of a job running in another process is a flag the running worker reads with its heartbeat;
* ``started_at`` / ``finished_at`` are stamped automatically on entering running / a terminal state.
"""

from __future__ import annotations

import builtins
import json
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

from app.jobs.job_db import DB_FILENAME, JobDatabase, JobDatabaseError, open_job_database
from app.jobs.job_model import (
    ACTIVE_STATES,
    INTERRUPTED_ERROR,
    INTERRUPTED_MESSAGE,
    REFIT_INTERRUPTED_ERROR,
    RUNNER_KINDS,
    TERMINAL_STATES,
    TRANSITIONS,
    InvalidTransitionError,
    Job,
    JobConflictError,
    JobKind,
    JobNotFoundError,
    JobState,
    now,
    ts,
)

__all__ = ["ACTIVE_STATES", "DB_FILENAME", "INTERRUPTED_ERROR", "INTERRUPTED_MESSAGE", "TERMINAL_STATES", "TRANSITIONS",
           "InvalidTransitionError", "Job", "JobConflictError", "JobDatabaseError", "JobKind", "JobNotFoundError",
           "JobState", "JobStore", "StaleJobError"]

_UPDATABLE = ("state", "progress", "stage", "step", "total_steps", "message", "metrics", "error", "result_version",
              "result")
_JSON_COLUMNS = ("params", "metrics", "result")
_RUNNER_KINDS = ", ".join(repr(k) for k in RUNNER_KINDS)
_ROW_FIELDS = frozenset(Job.model_fields)
STALE_ERROR = "interrupted: worker {worker} sent no heartbeat for {seconds:.0f} s (it stopped or lost the database)"


class StaleJobError(InvalidTransitionError):
    """``update(..., expect=...)`` found the job in another state than the caller saw (someone else moved it)."""


class JobStore:
    """Thread-safe CRUD over the ``jobs`` table; open one per process and share it."""

    def __init__(self, store_dir: Path | None = None, *, url: str | None = None,
                 database: JobDatabase | None = None) -> None:
        if database is None:
            if store_dir is None and not url:
                raise ValueError("JobStore needs a store directory (SQLite) or a postgresql:// URL")
            database = open_job_database(Path(store_dir or "."), url)
        self.db = database
        self.path = getattr(database, "path", None)  # the SQLite file, when there is one

    @property
    def shared(self) -> bool:
        """True when other processes share these rows (PostgreSQL): a restart must only reap stale jobs."""
        return self.db.shared

    def close(self) -> None:
        """Close the connection(s); the store is unusable afterwards."""
        self.db.close()

    def __enter__(self) -> JobStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def create(self, category: str, kind: JobKind = "finetune", params: dict[str, Any] | None = None) -> Job:
        """Queue a new job; raises ``JobConflictError`` (409) if the category already has an active one."""
        job = Job(id=str(uuid.uuid4()), category=category, kind=kind, state=JobState.queued,
                  params=dict(params or {}), created_at=now())
        row = _to_row(job)
        try:
            with self.db.tx() as tx:
                tx.run(f"INSERT INTO jobs ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                       tuple(row.values()))
        except self.db.integrity_errors as e:
            active = self.active_for(category)
            if active is None:
                raise
            raise JobConflictError(
                f"Category {category!r} already has an active {active.kind} job {active.id} ({active.state}); "
                "wait for it to finish or cancel it.",
                active_job_id=active.id,
            ) from e
        return job

    def get(self, job_id: str) -> Job | None:
        """The job with this id, or None."""
        with self.db.tx() as tx:
            row = tx.one("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return _from_row(row) if row else None

    def list(
        self, category: str | None = None, state: JobState | str | None = None, limit: int = 100
    ) -> list[Job]:
        """Newest first, optionally filtered by category and/or state."""
        if not 1 <= limit <= 10_000:
            raise ValueError("limit must be between 1 and 10000")
        where, args = [], []
        if category is not None:
            where.append("category = ?")
            args.append(category)
        if state is not None:
            where.append("state = ?")
            args.append(JobState(state).value)
        sql = "SELECT * FROM jobs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += f" ORDER BY created_at DESC, {self.db.order_key} DESC LIMIT ?"
        with self.db.tx() as tx:
            rows = tx.all(sql, (*args, limit))
        return [_from_row(r) for r in rows]

    def active_for(self, category: str) -> Job | None:
        """The queued or running fine-tune of ``category``, if any (at most one exists)."""
        with self.db.tx() as tx:
            row = tx.one("SELECT * FROM jobs WHERE category = ? AND state IN ('queued', 'running') "
                         f"AND kind IN ({_RUNNER_KINDS})", (category,))
        return _from_row(row) if row else None

    def update(self, job_id: str, *, expect: JobState | None = None, **fields: Any) -> Job:
        """Change mutable fields atomically, validating the state transition; returns the new record.

        ``expect``: the state the caller saw; if the row is in another state now, ``StaleJobError`` and nothing
        is written (cancelling a queued job must not cancel it after another worker started it).
        """
        unknown = set(fields) - set(_UPDATABLE)
        if unknown:
            raise ValueError(f"cannot update {sorted(unknown)}; updatable fields: {list(_UPDATABLE)}")
        with self.db.tx() as tx:
            row = tx.one(f"SELECT * FROM jobs WHERE id = ?{self.db.lock_rows}", (job_id,))
            if row is None:
                raise JobNotFoundError(f"No job with id {job_id!r}.")
            current = _from_row(row)
            if expect is not None and current.state != expect:
                raise StaleJobError(f"Job {job_id} is {current.state} now, not {JobState(expect)}.")
            if current.state in TERMINAL_STATES:
                raise InvalidTransitionError(f"Job {job_id} is {current.state}; finished jobs cannot change.")
            changes = dict(fields)
            if "state" in changes:
                new = JobState(changes["state"])
                changes["state"] = new
                if new != current.state:
                    if new not in TRANSITIONS[current.state]:
                        raise InvalidTransitionError(
                            f"Job {job_id} cannot go from {current.state} to {new}; "
                            f"allowed: {sorted(s.value for s in TRANSITIONS[current.state]) or 'none'}."
                        )
                    if new == JobState.running and current.started_at is None:
                        changes["started_at"] = now()
                    if new in TERMINAL_STATES:
                        changes["finished_at"] = now()
            # Validate through the model so bad values (progress 1.5) never reach the database.
            updated = Job.model_validate({**current.model_dump(), **changes})
            row_changes = {k: v for k, v in _to_row(updated).items() if k in changes}
            if row_changes:
                assignments = ", ".join(f"{k} = ?" for k in row_changes)
                tx.run(f"UPDATE jobs SET {assignments} WHERE id = ?", (*row_changes.values(), job_id))
        return updated

    def claim_next(self, worker: str) -> Job | None:
        """Atomically move the oldest queued job to running for ``worker``; None when nothing is queued.

        Exactly one of any number of concurrent claimers (threads, processes, machines) gets a given job.
        """
        with self.db.tx() as tx:
            row = tx.one(f"SELECT id FROM jobs WHERE state = 'queued' AND kind IN ({_RUNNER_KINDS}) "
                         f"ORDER BY created_at, {self.db.order_key} LIMIT 1{self.db.skip_locked}")
            if row is None:
                return None
            stamp = ts(now())
            if not tx.run("UPDATE jobs SET state = 'running', worker = ?, started_at = ?, heartbeat_at = ?, "
                          "message = ? WHERE id = ? AND state = 'queued'",
                          (worker, stamp, stamp, "loading shots", row["id"])):
                return None  # taken meanwhile (cannot happen under the locks above; the poll retries)
            claimed = tx.one("SELECT * FROM jobs WHERE id = ?", (row["id"],))
        return _from_row(claimed) if claimed else None

    def claim(self, job_id: str, worker: str, message: str) -> Job:
        """Move this queued job to running for ``worker`` (a refit that got its category's lock);
        ``StaleJobError`` when it is no longer queued (cancelled meanwhile)."""
        with self.db.tx() as tx:
            stamp = ts(now())
            if not tx.run("UPDATE jobs SET state = 'running', worker = ?, started_at = ?, heartbeat_at = ?, "
                          "message = ? WHERE id = ? AND state = 'queued'", (worker, stamp, stamp, message, job_id)):
                raise StaleJobError(f"Job {job_id} is no longer queued.")
            row = tx.one("SELECT * FROM jobs WHERE id = ?", (job_id,))
        assert row is not None  # updated in this transaction
        return _from_row(row)

    def heartbeat(self, job_id: str, worker: str) -> str:
        """Stamp that ``worker`` still runs ``job_id``: ``"ok"``, ``"cancel"`` (someone asked) or ``"lost"``.

        ``"lost"``: the job is no longer this worker's running job (reaped as stale, or gone), so stop it.
        """
        with self.db.tx() as tx:
            tx.run("UPDATE jobs SET heartbeat_at = ? WHERE id = ? AND worker = ? AND state = 'running'",
                   (ts(now()), job_id, worker))
            row = tx.one("SELECT state, worker, cancel_requested FROM jobs WHERE id = ?", (job_id,))
        if row is None or row["state"] != JobState.running or row["worker"] != worker:
            return "lost"
        return "cancel" if row["cancel_requested"] else "ok"

    def request_cancel(self, job_id: str, message: str = "cancellation requested") -> Job:
        """Ask the worker running ``job_id`` (in any process) to stop at its next heartbeat."""
        with self.db.tx() as tx:
            n = tx.run("UPDATE jobs SET cancel_requested = 1, message = ? WHERE id = ? AND state = 'running'",
                       (message, job_id))
        job = self.get(job_id)
        if job is None:
            raise JobNotFoundError(f"No job with id {job_id!r}.")
        if n == 0:
            raise StaleJobError(f"Job {job_id} is {job.state}, not running.")
        return job

    def reap_stale(self, stale_after_s: float) -> builtins.list[str]:  # `list` here is the method above
        """Fail running jobs whose worker sent no heartbeat for ``stale_after_s``; returns their ids."""
        cutoff = ts(now() - timedelta(seconds=stale_after_s))
        with self.db.tx() as tx:
            rows = tx.all("SELECT id, worker FROM jobs WHERE state = 'running' AND "
                          f"COALESCE(heartbeat_at, started_at, created_at) < ?{self.db.skip_locked}", (cutoff,))
            stamp = ts(now())
            for row in rows:
                error = STALE_ERROR.format(worker=row["worker"] or "?", seconds=stale_after_s)
                tx.run("UPDATE jobs SET state = 'failed', error = ?, finished_at = ? WHERE id = ?",
                       (error, stamp, row["id"]))
        return [r["id"] for r in rows]

    def mark_interrupted(self) -> builtins.list[str]:
        """At startup of the only process using this database, fail every job a previous one left active."""
        with self.db.tx() as tx:
            ids = [r["id"] for r in tx.all(f"SELECT id FROM jobs WHERE state IN ('queued', 'running')"
                                           f"{self.db.lock_rows}")]
            stamp = ts(now())
            tx.run("UPDATE jobs SET state = 'failed', error = ?, message = ?, finished_at = ? "
                   f"WHERE state IN ('queued', 'running') AND kind IN ({_RUNNER_KINDS})",
                   (INTERRUPTED_ERROR, INTERRUPTED_MESSAGE, stamp))  # the last progress message is stale now
            for row in tx.all("SELECT id, category FROM jobs WHERE state IN ('queued', 'running')"):
                tx.run("UPDATE jobs SET state = 'failed', error = ?, message = NULL, finished_at = ? WHERE id = ?",
                       (REFIT_INTERRUPTED_ERROR.format(category=row["category"]), stamp, row["id"]))
        return ids

    def count_by_state(self) -> dict[JobState, int]:
        """Number of jobs per state (every state present, zeros included) for the ``clipshot_jobs`` gauge."""
        counts = dict.fromkeys(JobState, 0)
        with self.db.tx() as tx:
            for row in tx.all("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state"):
                counts[JobState(row["state"])] = int(row["n"])
        return counts


def _to_row(job: Job) -> dict[str, Any]:
    data = job.model_dump()
    data["state"] = job.state.value
    json_ready = job.model_dump(mode="json", include=set(_JSON_COLUMNS))  # Paths, datetimes -> strings
    for col in _JSON_COLUMNS:
        if json_ready[col] is not None:
            data[col] = json.dumps(json_ready[col], sort_keys=True)
    for col in ("created_at", "started_at", "finished_at"):
        if data[col] is not None:
            data[col] = ts(data[col])
    return data


def _from_row(row: dict[str, Any]) -> Job:
    data = {k: v for k, v in row.items() if k in _ROW_FIELDS}  # drop seq, heartbeat_at, cancel_requested
    for col in _JSON_COLUMNS:
        if data[col] is not None:
            data[col] = json.loads(data[col])
    return Job.model_validate(data)
