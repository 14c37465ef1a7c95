"""Durable records of background jobs (fine-tunes) in a SQLite file inside the store directory.

Why SQLite: job state must survive restarts (so clients polling a job id get an answer, and jobs cut
off by a restart are reported as failed rather than "running" forever), it needs no server, and the
stdlib ships it. One connection guarded by a lock serves all threads; WAL mode lets readers (e.g. an
operator's ``sqlite3`` shell) look while the service writes.

Rules enforced here, not in the routes, so every caller gets them:

* state machine: queued -> running | failed | cancelled; running -> succeeded | failed | cancelled;
  terminal states (succeeded, failed, cancelled) are final and the record is then immutable;
* at most one active (queued or running) job per category, enforced by a partial UNIQUE index, so two
  concurrent requests cannot both start a fine-tune (the loser gets ``JobConflictError`` = 409);
* ``started_at`` / ``finished_at`` are stamped automatically on entering running / a terminal state.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.errors import ConflictError, NotFoundError

DB_FILENAME = "jobs.sqlite3"
INTERRUPTED_ERROR = "interrupted by service restart"
INTERRUPTED_MESSAGE = "interrupted by a service restart; start it again with POST /v1/categories/{category}/finetune"


class JobState(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


ACTIVE_STATES = frozenset({JobState.queued, JobState.running})
TERMINAL_STATES = frozenset({JobState.succeeded, JobState.failed, JobState.cancelled})
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.queued: frozenset({JobState.running, JobState.failed, JobState.cancelled}),
    JobState.running: frozenset({JobState.succeeded, JobState.failed, JobState.cancelled}),
    JobState.succeeded: frozenset(),
    JobState.failed: frozenset(),
    JobState.cancelled: frozenset(),
}
JobKind = Literal["finetune"]
_UPDATABLE = ("state", "progress", "step", "total_steps", "message", "metrics", "error", "result_version")
_JSON_COLUMNS = ("params", "metrics")

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    category TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('finetune')),
    state TEXT NOT NULL CHECK (state IN ({", ".join(repr(s.value) for s in JobState)})),
    progress REAL NOT NULL DEFAULT 0 CHECK (progress >= 0 AND progress <= 1),
    step INTEGER,
    total_steps INTEGER,
    message TEXT,
    params TEXT NOT NULL DEFAULT '{{}}',
    metrics TEXT,
    error TEXT,
    result_version INTEGER,
    created_at TEXT NOT NULL,
    started_at TEXT,
    finished_at TEXT
);
CREATE INDEX IF NOT EXISTS jobs_by_created ON jobs (created_at DESC);
CREATE INDEX IF NOT EXISTS jobs_by_category ON jobs (category, created_at DESC);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_one_active_per_category
    ON jobs (category) WHERE state IN ('queued', 'running');
"""


class Job(BaseModel):
    """One background job; also the API response schema for job endpoints."""

    model_config = ConfigDict(frozen=True)

    id: str = Field(description="Job id (UUID4).")
    category: str = Field(description="Product category the job works on.")
    kind: JobKind = Field(description="What the job does.")
    state: JobState = Field(description="Lifecycle state; succeeded, failed and cancelled are final.")
    progress: float = Field(0.0, ge=0.0, le=1.0, description="Fraction done, 0..1.")
    step: int | None = Field(None, ge=0, description="Current optimisation step, if known.")
    total_steps: int | None = Field(None, ge=0, description="Planned number of steps, if known.")
    message: str | None = Field(None, description="Latest human-readable status line.")
    params: dict[str, Any] = Field(default_factory=dict, description="Parameters the job was started with.")
    metrics: dict[str, Any] | None = Field(
        None, description="Training/validation metrics reported by the job."
    )
    error: str | None = Field(None, description="Why the job failed, when state is failed.")
    result_version: int | None = Field(None, description="Adapter version the job produced, when succeeded.")
    created_at: datetime = Field(description="When the job was queued (UTC).")
    started_at: datetime | None = Field(None, description="When the job started running (UTC).")
    finished_at: datetime | None = Field(None, description="When the job reached a final state (UTC).")

    @property
    def active(self) -> bool:
        """True while queued or running: the category is busy."""
        return self.state in ACTIVE_STATES


class JobNotFoundError(NotFoundError):
    code = "job_not_found"


class InvalidTransitionError(ConflictError):
    code = "invalid_job_transition"


class JobConflictError(ConflictError):
    """A category already has an active job; ``active_job_id`` names it so the client can poll that one."""

    code = "job_already_active"

    def __init__(self, message: str, *, active_job_id: str | None) -> None:
        super().__init__(message)
        self.active_job_id = active_job_id


def _now() -> datetime:
    return datetime.now(UTC)


def _ts(dt: datetime) -> str:
    """Fixed-width UTC text, so ORDER BY on the column is chronological."""
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class JobStore:
    """Thread-safe CRUD over the ``jobs`` table; open one per process and share it."""

    def __init__(self, store_dir: Path, *, filename: str = DB_FILENAME) -> None:
        store_dir = Path(store_dir)
        store_dir.mkdir(parents=True, exist_ok=True)
        self.path = store_dir / filename
        self._lock = threading.RLock()
        # isolation_level=None: we issue BEGIN IMMEDIATE ourselves, so read-check-write is atomic.
        self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        self._conn.row_factory = sqlite3.Row
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.executescript(_SCHEMA)

    def close(self) -> None:
        """Close the connection; the store is unusable afterwards."""
        with self._lock:
            self._conn.close()

    def __enter__(self) -> JobStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def create(self, category: str, kind: JobKind = "finetune", params: dict[str, Any] | None = None) -> Job:
        """Queue a new job; raises ``JobConflictError`` (409) if the category already has an active one."""
        job = Job(
            id=str(uuid.uuid4()),
            category=category,
            kind=kind,
            state=JobState.queued,
            params=dict(params or {}),
            created_at=_now(),
        )
        row = _to_row(job)
        cols = ", ".join(row)
        try:
            with self._tx() as conn:
                conn.execute(
                    f"INSERT INTO jobs ({cols}) VALUES ({', '.join('?' * len(row))})", tuple(row.values())
                )
        except sqlite3.IntegrityError as e:
            active = self.active_for(category)
            if active is None:
                raise
            raise JobConflictError(
                f"Category {category!r} already has an active {active.kind} job {active.id} "
                f"({active.state}); "
                "wait for it to finish or cancel it.",
                active_job_id=active.id,
            ) from e
        return job

    def get(self, job_id: str) -> Job | None:
        """The job with this id, or None."""
        with self._lock:
            row = self._conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
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
        sql += " ORDER BY created_at DESC, rowid DESC LIMIT ?"
        with self._lock:
            rows = self._conn.execute(sql, (*args, limit)).fetchall()
        return [_from_row(r) for r in rows]

    def active_for(self, category: str) -> Job | None:
        """The queued or running job of ``category``, if any (at most one exists)."""
        with self._lock:
            row = self._conn.execute(
                "SELECT * FROM jobs WHERE category = ? AND state IN ('queued', 'running')", (category,)
            ).fetchone()
        return _from_row(row) if row else None

    def update(self, job_id: str, **fields: Any) -> Job:
        """Change mutable fields atomically, validating the state transition; returns the new record."""
        unknown = set(fields) - set(_UPDATABLE)
        if unknown:
            raise ValueError(f"cannot update {sorted(unknown)}; updatable fields: {list(_UPDATABLE)}")
        with self._tx() as conn:
            row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise JobNotFoundError(f"No job with id {job_id!r}.")
            current = _from_row(row)
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
                        changes["started_at"] = _now()
                    if new in TERMINAL_STATES:
                        changes["finished_at"] = _now()
            # Validate through the model so bad values (progress 1.5) never reach the database.
            updated = Job.model_validate({**current.model_dump(), **changes})
            row_changes = {k: v for k, v in _to_row(updated).items() if k in changes}
            if row_changes:
                assignments = ", ".join(f"{k} = ?" for k in row_changes)
                conn.execute(f"UPDATE jobs SET {assignments} WHERE id = ?", (*row_changes.values(), job_id))
        return updated

    def mark_interrupted(self) -> list[str]:
        """At startup, fail every job a previous process left queued/running; returns their ids."""
        now = _ts(_now())
        with self._tx() as conn:
            ids = [r["id"] for r in conn.execute("SELECT id FROM jobs WHERE state IN ('queued', 'running')")]
            conn.execute(
                "UPDATE jobs SET state = 'failed', error = ?, message = ?, finished_at = ? "
                "WHERE state IN ('queued', 'running')",
                (INTERRUPTED_ERROR, INTERRUPTED_MESSAGE, now),  # the last progress message is stale now
            )
        return ids

    def count_by_state(self) -> dict[JobState, int]:
        """Number of jobs per state (every state present, zeros included) for the ``clipshot_jobs`` gauge."""
        counts = dict.fromkeys(JobState, 0)
        with self._lock:
            for row in self._conn.execute("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state"):
                counts[JobState(row["state"])] = row["n"]
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
            data[col] = _ts(data[col])
    return data


def _from_row(row: sqlite3.Row) -> Job:
    data = dict(row)
    for col in _JSON_COLUMNS:
        if data[col] is not None:
            data[col] = json.loads(data[col])
    return Job.model_validate(data)
