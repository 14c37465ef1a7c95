"""JobRunner: the background thread that runs fine-tune jobs one at a time on the shared device.

Why a single thread driving ``FewShotTrainer.steps()`` one ``next()`` at a time through the device worker
(``submit(..., priority=TRAIN)``): predictions keep priority between steps, so a 10-minute fine-tune never
stalls a production line for more than one step. Jobs live in a ``JobStore`` (SQLite, or PostgreSQL shared by
several replicas) so clients can poll them across restarts. Jobs are *claimed* from the database
(``claim_next``), so with a shared database any number of runners take each queued job exactly once; the
runner beats a heartbeat for its job and reads cancellation requests from other processes with it. On
``start()`` a runner alone on its database fails whatever a previous process left queued/running; on a shared
one it fails only running jobs whose worker stopped beating (``reap_stale``), and it keeps doing that while
it polls, so a dead worker's job ends as failed within ``job_stale_s`` plus one poll.

Wiring (what ``app.main`` must pass; construct it BEFORE ``CategoryService``, which enqueues through it)::

    runner = JobRunner(settings=settings, store=adapter_store, job_store=job_store, detector=detector,
                       device_worker=device_worker, adapter_cache=adapter_cache, metrics=metrics)
    runner.start()            # in lifespan startup: mark_interrupted() + start the thread
    app.state.job_runner = runner
    ...
    runner.stop()             # in lifespan shutdown, BEFORE device_worker stops

Outcome of a job: succeeded (a new version saved), cancelled (by request; nothing written), or failed (error
text; ``"service stopping"`` when ``stop()`` interrupted it). A succeeded job's ``metrics.promotion`` says
what became of its version: ``promoted`` (activated and hot-swapped via ``adapter_cache.invalidate``),
``not_promotable`` (the trainer did not beat the memory adapter) or ``superseded`` (saved inactive because
the active version changed during training). The job trains from the version active when it starts, and
holds it (retention keeps it); it promotes only by a compare-and-set on the active version, and only while
the active version is that one or differs from it in its decision policy alone (a threshold change): then
the fine-tuned version takes the active version's *current* policy, so an operator's threshold choice made
during training survives. A rollback, a registration or feedback during training supersedes the job
(``app/categories/promotion.py``).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Generator
from concurrent.futures import CancelledError, Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any

from app.categories.promotion import save_result
from app.categories.shot_ledger import Ledger, decode_refs, ledger_at
from app.core.config import Settings
from app.errors import ConflictError, OverloadedError
from app.jobs.finetune_plan import finetune_config, memory_baseline, trained_geometry
from app.jobs.job_model import RUNNER_KINDS
from app.jobs.job_store import ACTIVE_STATES, Job, JobNotFoundError, JobState, JobStore, StaleJobError
from app.metrics import Metrics
from app.serving.device_worker import TRAIN
from clipshot.detector import Detector
from model_store import AdapterStore
from training.fewshot import FewShotConfig, FewShotTrainer
from training.progress import Cancelled, CancelToken, Progress

log = logging.getLogger(__name__)
STOPPING_ERROR = "service stopping: the job was interrupted; start it again with POST /v1/categories/{c}/finetune"
TRAIN_SHARE = 0.9  # progress fraction reserved for optimisation steps; the rest is validation + saving
_DONE = object()
PHASE_MESSAGES = {"validate": "validating fine-tuned vs memory adapter on held-out shots and synthetic defects",
                  "finalize": "rebuilding memory bank and calibration from all shots"}


@dataclass
class _Running:
    """The job currently on the device: its cancel token and why it was cancelled."""

    job_id: str
    category: str
    token: CancelToken = field(default_factory=CancelToken)
    reason: str | None = None  # "request" or "stopping"
    phase: str = "starting"
    reported: str = "starting"

    def observe(self, progress: Progress) -> None:
        """Trainer progress callback (runs on the device worker): only remember the phase, never block."""
        self.phase = progress.phase


class JobRunner:
    """Runs queued fine-tune jobs in creation order on one background thread."""

    def __init__(self, *, settings: Settings, store: AdapterStore, job_store: JobStore, detector: Detector,
                 device_worker: Any, adapter_cache: Any, metrics: Metrics,
                 trainer_factory: Callable[..., Any] = FewShotTrainer, progress_interval: float = 0.5,
                 poll_interval: float = 1.0) -> None:
        self.settings, self.store, self.jobs, self.detector = settings, store, job_store, detector
        self.worker, self.cache, self.metrics = device_worker, adapter_cache, metrics
        self.trainer_factory = trainer_factory  # tests inject a scripted trainer with the same protocol
        self.progress_interval, self.poll_interval = progress_interval, poll_interval
        self._lock = threading.Lock()  # guards _current and the claim/cancel race on a job's state
        self._finished = threading.Condition(self._lock)
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._current: _Running | None = None
        self._thread: threading.Thread | None = None
        self._beat_thread: threading.Thread | None = None
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.stale_s = settings.job_stale_s
        self.claims_jobs = settings.job_worker

    # -- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> None:
        """Fail jobs that can never finish (see the module doc), then start claiming (if this is a worker)."""
        interrupted = self.jobs.reap_stale(self.stale_s) if self.jobs.shared else self.jobs.mark_interrupted()
        if interrupted:
            log.warning("marked %d interrupted job(s) failed: %s", len(interrupted), interrupted)
        self._refresh_gauge()
        self._stopping.clear()
        self._thread = threading.Thread(target=self._loop, name="clipshot-job-runner", daemon=True)
        self._beat_thread = threading.Thread(target=self._beat, name="clipshot-job-heartbeat", daemon=True)
        self._thread.start()
        self._beat_thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """End promptly: cancel the running job (-> failed "service stopping"), fail queued ones, join."""
        with self._lock:
            self._stopping.set()
            if self._current is not None:
                self._current.reason = "stopping"
                self._current.token.cancel()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("job runner did not stop within %.1fs (a device call is still running)", timeout)
        if self._beat_thread is not None:
            self._beat_thread.join(timeout)
        if self.jobs.shared:
            return  # queued jobs stay queued: another worker on the shared database takes them
        for job in self.jobs.list(state=JobState.queued, limit=10_000):
            if job.kind not in RUNNER_KINDS:
                continue  # a refit waiting for its category's lock: RefitJobs.stop ends it
            self._finish(job.id, None, state=JobState.failed, error=STOPPING_ERROR.format(c=job.category))

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping.is_set()

    # -- API used by the routes / CategoryService -----------------------------------------------------
    def enqueue(self, category: str, params: dict[str, Any]) -> Job:
        """Queue a fine-tune (409 ``JobConflictError`` if the category already has an active job)."""
        if not self.running:
            raise OverloadedError("the job runner is not running (service starting or stopping)", retry_after=5)
        job = self.jobs.create(category, "finetune", params)
        self._refresh_gauge()
        self._wake.set()
        return job

    def cancel(self, job_id: str) -> Job:
        """Cancel a queued job at once, or ask the running one (here or in any worker) to stop; returns the record."""
        with self._lock:
            job = self.jobs.get(job_id)
            if job is None:
                raise JobNotFoundError(f"No job with id {job_id!r}.")
            if job.state not in ACTIVE_STATES:
                raise ConflictError(f"Job {job_id} already finished ({job.state}); nothing to cancel.",
                                    code="job_finished")
            if job.state == JobState.running and job.kind not in RUNNER_KINDS:
                raise ConflictError(f"Job {job_id} is a {job.kind} refit already fitting; it cannot be cancelled "
                                    "(it ends within its fit; roll back with .../activate)", code="job_not_cancellable")
            if job.state == JobState.queued:
                try:  # only if still queued: a worker may claim it this very moment
                    job = self.jobs.update(job_id, expect=JobState.queued, state=JobState.cancelled,
                                           message="cancelled before it started")
                except StaleJobError:
                    job = self.jobs.get(job_id) or job
            if job.state == JobState.running:
                if self._current is not None and self._current.job_id == job_id:
                    self._current.reason = self._current.reason or "request"
                    self._current.token.cancel()
                try:  # the flag reaches a worker in another process with its next heartbeat
                    job = self.jobs.request_cancel(job_id)
                except StaleJobError as exc:  # finished in between
                    raise ConflictError(str(exc), code="job_finished") from exc
        self._refresh_gauge()
        return job

    def wait(self, job_id: str, timeout: float) -> Job | None:
        """Block until the job is final or ``timeout`` passes; returns the latest record."""
        deadline = time.monotonic() + timeout
        with self._finished:
            while True:
                job = self.jobs.get(job_id)
                remaining = deadline - time.monotonic()
                if job is None or job.state not in ACTIVE_STATES or remaining <= 0:
                    return job
                self._finished.wait(min(remaining, 0.25))

    def cancel_category(self, category: str, *, timeout: float = 30.0) -> Job | None:
        """Cancel the category's active job and wait for it to end (so nothing saves into a deleted category)."""
        job = self.jobs.active_for(category)
        if job is None:
            return None
        try:
            self.cancel(job.id)
        except ConflictError:  # finished in between
            return self.jobs.get(job.id)
        return self.wait(job.id, timeout)

    # -- the thread -----------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                if self.jobs.shared and self.jobs.reap_stale(self.stale_s):
                    self._refresh_gauge()
                if self.claims_jobs and self._run_next():
                    continue
            except Exception:  # never let one job (or a database hiccup) kill the runner thread
                log.exception("job runner: unexpected error")
            self._wake.wait(self.poll_interval)
            self._wake.clear()

    def _run_next(self) -> bool:
        """Claim the oldest queued job (exactly one worker gets it) and run it; False when none was queued."""
        with self._lock:  # cancel() sees either no claim yet or ``_current`` set
            if self._stopping.is_set():
                return False
            job = self.jobs.claim_next(self.worker_id)
            if job is None:
                return False
            self._current = running = _Running(job.id, job.category)
        self._run(job, running)
        return True

    def _beat(self) -> None:
        """Heartbeat of the running job; turns a cancel request or a lost claim into the job's cancel token."""
        while not self._stopping.wait(max(0.1, self.stale_s / 4)):
            running = self._current
            if running is None:
                continue
            try:
                status = self.jobs.heartbeat(running.job_id, self.worker_id)
            except Exception:  # a database hiccup: the next beat retries; reap_stale covers a long outage
                log.warning("job heartbeat failed", exc_info=True)
                continue
            if status != "ok" and not running.token.cancelled:
                running.reason = running.reason or ("request" if status == "cancel" else "lost")
                running.token.cancel()

    def _run(self, job: Job, running: _Running) -> None:
        self._refresh_gauge()
        fields: dict[str, Any]
        try:
            fields = {"state": JobState.succeeded, **self._train(job, running)}
        except Cancelled:  # by request -> cancelled; by stop() or a stopped device worker -> failed
            if running.reason == "request":
                fields = {"state": JobState.cancelled, "message": "cancelled; no version was written"}
            else:
                fields = {"state": JobState.failed, "error": STOPPING_ERROR.format(c=job.category)}
        except Exception as exc:
            log.exception("fine-tune job %s (%s) failed", job.id, job.category)
            fields = {"state": JobState.failed, "error": f"{type(exc).__name__}: {exc}"}
        self._finish(job.id, running, **fields)

    def _finish(self, job_id: str, running: _Running | None, **fields: Any) -> None:
        with self._finished:
            try:
                job = self.jobs.update(job_id, **fields)
            except ConflictError:  # already final (e.g. cancelled while queued)
                job = None
            if running is not None:
                self._current = None
            self._finished.notify_all()
        if job is not None and job.started_at is not None and job.finished_at is not None:
            seconds = (job.finished_at - job.started_at).total_seconds()
            self.metrics.job_duration.labels(job.state.value).observe(seconds)
        self._refresh_gauge()

    def _train(self, job: Job, running: _Running) -> dict[str, Any]:
        if not self.store.versions(job.category):
            raise RuntimeError(f"category {job.category!r} has no versions")
        with self.store.hold(job.category) as held:  # retention keeps the trained-from version meanwhile
            ledger = ledger_at(self.store, job.category, self.store.hold_active(held, job.category))
            return self._train_from(job, running, ledger)

    def _train_from(self, job: Job, running: _Running, ledger: Ledger) -> dict[str, Any]:
        """Train on the shots, confirmed defects and policy of ``ledger`` (the version active at the start)."""
        if ledger.manifest is None or not ledger.goods:
            raise RuntimeError(f"category {job.category!r} has no readable active version with stored shots")
        images = decode_refs(self.store, job.category, ledger.goods, self.settings)
        object_name = ledger.manifest.adapter.get("object_name")
        defects = decode_refs(self.store, job.category, ledger.defects, self.settings)
        config = finetune_config(self.settings, job.params, ledger)
        geometry = trained_geometry(ledger)
        baseline = memory_baseline(self.store, self.detector, job.category, ledger, config)
        trainer = self._device(lambda: self.trainer_factory(
            self.detector, images, category=job.category, object_name=object_name, config=config,
            progress=running.observe, cancel=running.token, defects=defects, geometry=geometry,
            baseline=baseline), running)
        steps = None
        try:
            steps = trainer.steps()
            last_write = 0.0
            while (progress := self._device(lambda: next(steps, _DONE), running)) is not _DONE:
                if time.monotonic() - last_write >= self.progress_interval:
                    self.jobs.update(job.id, **self._progress_fields(progress, config))
                    last_write = time.monotonic()
            self.jobs.update(job.id, progress=TRAIN_SHARE, message="validating against the memory adapter")
            result = self._device_steps(trainer.result_steps(), running)
        finally:
            self._cleanup(trainer, steps)
        running.token.raise_if_cancelled()  # a cancel that arrived during result(): write nothing
        return self._save(job, result, ledger)

    @staticmethod
    def _progress_fields(progress: Progress, config: FewShotConfig) -> dict[str, Any]:
        fractions = [progress.step / config.steps] if config.steps else []
        if config.seconds:
            fractions.append(progress.elapsed / config.seconds)
        loss = "" if progress.loss is None else f", loss {progress.loss:.4f}"
        return {"progress": round(min(1.0, max(fractions, default=0.0)) * TRAIN_SHARE, 4), "step": progress.step,
                "total_steps": progress.total_steps, "message": f"training step {progress.step}{loss}"}

    def _device_steps(self, steps: Generator[Any, None, Any], running: _Running) -> Any:
        """Run a generator of bounded device chunks (``clipshot.chunked``) one chunk per device task, so
        predictions overtake between chunks; a cancel or stop ends it at the next chunk boundary."""
        def checked() -> Generator[None, None, Any]:
            try:
                while True:
                    running.token.raise_if_cancelled()
                    try:
                        next(steps)
                    except StopIteration as done:
                        return done.value
                    yield
            finally:
                steps.close()
        return self._wait(self.worker.submit_steps(checked(), priority=TRAIN), running)

    def _device(self, fn: Callable[[], Any], running: _Running) -> Any:
        """Run ``fn`` on the device worker; a cancel/stop drops it while it still waits in the queue."""
        return self._wait(self.worker.submit(fn, priority=TRAIN), running)

    def _wait(self, future: Future, running: _Running) -> Any:
        """The device task's result, reporting phase changes while it runs; a cancel drops it if still queued."""
        while True:
            try:
                return future.result(timeout=0.1)
            except FutureTimeout:
                if running.token.cancelled and future.cancel():
                    raise Cancelled("training cancelled") from None
                if running.phase != running.reported and running.phase in PHASE_MESSAGES:
                    running.reported = running.phase  # result() runs long: tell pollers which part
                    self.jobs.update(running.job_id, message=PHASE_MESSAGES[running.phase])
            except CancelledError:  # the device worker stopped and dropped queued work
                raise Cancelled("device worker stopped") from None

    def _cleanup(self, trainer: Any, steps: Any) -> None:
        """Drop the temporary LoRA on the device worker (idempotent after a normal finish)."""
        def close() -> None:
            if steps is not None:
                steps.close()
            trainer.close()
        try:
            future = self.worker.submit(close, priority=TRAIN)
            if not self._stopping.is_set():
                future.result(timeout=60)
        except Exception:
            log.exception("could not release the training LoRA")

    def _save(self, job: Job, result: Any, ledger: Ledger) -> dict[str, Any]:
        """Persist the fine-tuned bundle and promote it if still current (see ``promotion.save_result``)."""
        fields = save_result(self.store, self.detector, job, result, ledger,
                             keep_versions=self.settings.keep_versions)
        if fields["metrics"]["promotion"] == "promoted":
            self.cache.invalidate(job.category)
        return fields

    def _refresh_gauge(self) -> None:
        try:
            self.metrics.set_job_counts({s.value: n for s, n in self.jobs.count_by_state().items()})
        except Exception:  # metrics must never break job handling (e.g. store closed at shutdown)
            log.debug("could not refresh the jobs gauge", exc_info=True)
