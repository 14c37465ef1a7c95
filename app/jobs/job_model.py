"""The job record, its state machine and its errors: what every job-database backend stores and returns.

Kept apart from ``job_store`` (the transactions) and ``job_db`` (SQLite / PostgreSQL connections) so the API
schema does not depend on which database holds the rows.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.errors import ConflictError, NotFoundError

INTERRUPTED_ERROR = "interrupted by service restart"
INTERRUPTED_MESSAGE = "interrupted by a service restart; start it again with POST /v1/categories/{category}/finetune"
REFIT_INTERRUPTED_ERROR = ("interrupted by service restart before the refit finished: if GET /v1/categories/{category} "
                           "shows no new active version, nothing changed; send the request again")


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
JobKind = Literal["finetune", "register", "feedback", "remove_shot"]
RUNNER_KINDS = ("finetune",)  # kinds the job runner claims from the queue; the others run where they were accepted
REFIT_KINDS = ("register", "feedback", "remove_shot")


class Job(BaseModel):
    """One background job; also the API response schema for job endpoints."""

    model_config = ConfigDict(frozen=True)

    id: str = Field(description="Job id (UUID4).")
    category: str = Field(description="Product category the job works on.")
    kind: JobKind = Field(description="What the job does.")
    state: JobState = Field(description="Lifecycle state; succeeded, failed and cancelled are final.")
    progress: float = Field(0.0, ge=0.0, le=1.0, description="Fraction done, 0..1.")
    stage: str | None = Field(None, description="Refit jobs: the part of the fit under way (e.g. `embedding shots`, "
                                                "`leave-one-out calibration`); `done` once finished.")
    step: int | None = Field(None, ge=0, description="Fine-tunes: the current optimisation step; refits: units of "
                                                     "the current stage done (images embedded, folds), if known.")
    total_steps: int | None = Field(None, ge=0, description="Planned number of steps (refits: units of the current "
                                                            "stage), if known.")
    message: str | None = Field(None, description="Latest human-readable status line.")
    params: dict[str, Any] = Field(default_factory=dict, description="Parameters the job was started with.")
    metrics: dict[str, Any] | None = Field(
        None, description="Training/validation metrics reported by the job."
    )
    error: str | None = Field(None, description="Why the job failed, when state is failed.")
    result_version: int | None = Field(None, description="Adapter version the job produced, when succeeded.")
    result: dict[str, Any] | None = Field(
        None, description="Refit jobs, once succeeded: the body the synchronous call answers (version, decision, "
                          "warnings, geometry, ...).")
    worker: str | None = Field(
        None, description="The worker process (`host:pid:tag`) that claimed the job, once it started."
    )
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


def now() -> datetime:
    """The current UTC time (one function, so every stamp has the same clock and zone)."""
    return datetime.now(UTC)


def ts(dt: datetime) -> str:
    """Fixed-width UTC text, so ORDER BY and < on the column are chronological in SQLite and PostgreSQL alike."""
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
