"""Refit jobs: registration, feedback and shot removal answered at once (202) and followed like fine-tunes.

Why not the fine-tune queue: a refit is a memory fit of seconds to a couple of minutes that an operator waits
for; queued behind a ten-minute fine-tune it would wait for nothing (fits already share the device chunk by
chunk). So a refit job runs at once in the process that accepted it, as an asyncio task that takes the
category's lock exactly as the synchronous call does (two edits of one product run one after the other, and a
lost compare-and-set is the same ``version_conflict``, as the job's error). The job store only records it:
``claim_next`` never takes these kinds, the task claims its own job by id (``JobStore.claim``) once it holds
the lock, beats the heartbeat while it runs, and on success stores the body the synchronous call answers
(``Job.result``).

Progress comes from the fit itself: the chunked fit yields ``clipshot.chunked.Stage`` between its chunks,
``CategoryService`` hands each one to ``RefitProgress.stage`` on the device thread, and the task writes the
latest one (stage, done/total, an overall fraction) to the record every ``interval`` seconds.

Restart: a process that dies mid-refit leaves its record running; the next start marks it failed
(``JobStore.mark_interrupted`` alone on a database, ``reap_stale`` on a shared one) with a reason saying the
version was either saved and active, or not made at all (its stored images are swept as orphans): check the
product and send again. A refit is never resumed: its uploaded bytes lived only in the request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

from starlette.concurrency import run_in_threadpool

from app.errors import ClipshotHTTPError, ConflictError
from app.jobs.job_store import Job, JobKind, JobState, JobStore, StaleJobError
from clipshot.chunked import Stage

log = logging.getLogger(__name__)

STOPPING_ERROR = ("service stopping: the refit was interrupted before it saved a version; nothing changed, "
                  "send the request again")
# Where each stage of a fit starts and ends on the overall progress bar (the fit's own order; a stage that is
# skipped, such as confirmed defects without any, just leaves a jump).
SPANS: dict[str, tuple[float, float]] = {
    "waiting for the product": (0.0, 0.0),
    "decoding images": (0.0, 0.05),
    "embedding shots": (0.05, 0.25),
    "building memory bank": (0.25, 0.3),
    "embedding light views": (0.3, 0.45),
    "making synthetic defects": (0.45, 0.5),
    "embedding synthetic defects": (0.5, 0.6),
    "leave-one-out calibration": (0.6, 0.9),
    "scoring confirmed defects": (0.9, 0.95),
    "saving version": (0.95, 1.0),
}


class RefitCancelled(Exception):
    """The job was cancelled while it waited for the category's lock: the refit must not start."""


class RefitProgress:
    """The running refit's progress: fed by the fit (any thread), read by the job task's writer."""

    def __init__(self, job_id: str, jobs: JobStore, worker: str) -> None:
        self.job_id, self.jobs, self.worker = job_id, jobs, worker
        self.running = False
        self._lock = threading.Lock()
        self._latest: Stage | None = None
        self._fraction = 0.0
        self._timings: list[dict[str, Any]] = []  # one entry per stage run: name, done, total, seconds
        self._since = time.monotonic()

    async def started(self) -> None:
        """Called under the category's lock before anything is written: queued -> running, or
        ``RefitCancelled`` if the job was cancelled while it waited."""
        try:
            await run_in_threadpool(self.jobs.claim, self.job_id, self.worker, "fitting")
        except StaleJobError as exc:
            raise RefitCancelled(str(exc)) from exc
        self.running = True

    def stage(self, stage: Stage) -> None:
        """Remember where the fit stands (called on the device thread between chunks: never blocks long)."""
        low, high = SPANS.get(stage.name, (self._fraction, self._fraction))
        share = stage.done / stage.total if stage.total else 1.0
        with self._lock:
            previous = self._latest
            if previous is None or previous.name != stage.name:
                now = time.monotonic()
                if self._timings:
                    self._timings[-1]["seconds"] = round(now - self._since, 3)
                self._timings.append({"name": stage.name, "done": 0, "total": stage.total, "seconds": None})
                self._since = now
            self._timings[-1]["done"] = stage.done
            self._latest = stage
            self._fraction = max(self._fraction, low + (high - low) * share)  # never backwards on the bar

    def snapshot(self) -> dict[str, Any] | None:
        """The record fields for the latest stage, or None before the fit reported one."""
        with self._lock:
            if self._latest is None:
                return None
            s = self._latest
            return {"stage": s.name, "step": s.done, "total_steps": s.total, "progress": round(self._fraction, 4),
                    "message": f"{s.name}: {s.done}/{s.total}"}

    def timings(self) -> list[dict[str, Any]]:
        """Each stage the fit went through: how far it got (done of total) and its seconds (the last one closed
        now), so a finished job still says where a slow refit spent its time."""
        with self._lock:
            if self._timings and self._timings[-1]["seconds"] is None:
                self._timings[-1]["seconds"] = round(time.monotonic() - self._since, 3)
            return [dict(t) for t in self._timings]


Refit = Callable[[RefitProgress], Awaitable[dict[str, Any]]]


class RefitJobs:
    """Starts refit jobs as tasks on the service's event loop and records them in the job store."""

    def __init__(self, job_store: JobStore, *, stale_s: float, interval: float = 0.2) -> None:
        self.jobs, self.stale_s, self.interval = job_store, stale_s, interval
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:refit-{uuid.uuid4().hex[:6]}"
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._stopping = False

    async def start(self, category: str, kind: JobKind, params: dict[str, Any], refit: Refit) -> Job:
        """Record a queued job and start ``refit`` (which claims it under the category's lock) in the background."""
        if self._stopping:
            raise ConflictError("the service is stopping; send the request again shortly", code="service_stopping")
        job = await run_in_threadpool(self.jobs.create, category, kind, params)
        task = asyncio.get_running_loop().create_task(self._run(job, refit), name=f"clipshot-refit-{job.id}")
        self._tasks[job.id] = task
        task.add_done_callback(lambda _: self._tasks.pop(job.id, None))
        return job

    async def stop(self, timeout: float = 10.0) -> None:
        """Interrupt the refits under way (each is marked failed "service stopping"; none writes a version)."""
        self._stopping = True
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)

    async def _run(self, job: Job, refit: Refit) -> None:
        progress = RefitProgress(job.id, self.jobs, self.worker_id)
        writer = asyncio.get_running_loop().create_task(self._write(progress))
        fields: dict[str, Any] | None
        try:
            result = await refit(progress)
        except RefitCancelled:
            fields = None  # already cancelled in the store; nothing ran
        except asyncio.CancelledError:
            fields = {"state": JobState.failed, "error": STOPPING_ERROR}
        except ClipshotHTTPError as exc:  # what the synchronous call would have answered, code first
            fields = {"state": JobState.failed, "error": f"{exc.code}: {exc.message}"}
        except Exception as exc:
            log.exception("%s job %s (%s) failed", job.kind, job.id, job.category)
            fields = {"state": JobState.failed, "error": f"{type(exc).__name__}: {exc}"}
        else:
            version = result.get("version")
            fields = {"state": JobState.succeeded, "result": result, "progress": 1.0, "stage": "done",
                      "result_version": version, "message": f"version {version} of {job.category} is active"}
        finally:
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer
        if fields is not None:
            fields["metrics"] = {"stages": progress.timings()}
            await asyncio.shield(run_in_threadpool(self._finish, job.id, fields))

    def _finish(self, job_id: str, fields: dict[str, Any]) -> None:
        """Write the final record; a job that left queued/running meanwhile (reaped) keeps its state."""
        current = self.jobs.get(job_id)
        if current is not None and current.state == JobState.queued and fields["state"] != JobState.failed:
            self.jobs.update(job_id, state=JobState.running)  # a refit that made no version never claimed
        try:
            self.jobs.update(job_id, **fields)
        except ConflictError:
            log.warning("refit job %s ended %s but its record was already final", job_id, fields["state"])

    async def _write(self, progress: RefitProgress) -> None:
        """Every ``interval``: the latest stage into the record; a heartbeat while running (reap_stale)."""
        written: dict[str, Any] | None = None
        last_beat = time.monotonic()
        while True:
            await asyncio.sleep(self.interval)
            snapshot = progress.snapshot()
            try:
                if snapshot is not None and snapshot != written:
                    await run_in_threadpool(partial(self.jobs.update, progress.job_id, **snapshot))
                    written = snapshot
                if progress.running and time.monotonic() - last_beat >= self.stale_s / 4:
                    await run_in_threadpool(self.jobs.heartbeat, progress.job_id, progress.worker)
                    last_beat = time.monotonic()
            except ConflictError:  # final meanwhile (reaped): the task's own end says what happened
                return
            except Exception:
                log.warning("could not record refit progress of %s", progress.job_id, exc_info=True)
