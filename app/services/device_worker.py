"""The single thread that owns the accelerator.

Why one thread: CUDA kernels from several threads interleave unpredictably, LoRA residency is
mutable model state, and an OOM in one request must not corrupt another's batch. Every piece of
device work (prediction batches, adapter attach/detach, readiness probes, training steps) is a
task on one priority queue: prediction (0) overtakes training (1), FIFO within a priority, so a
fine-tune running in the background only uses the device when no line is waiting for a verdict.

Long work is never one task: a fine-tune is one task per optimisation step, and a memory fit (registration,
feedback, shot removal) is a generator of bounded chunks (``clipshot.chunked``) that ``submit_steps`` runs one
chunk per task, queued again behind whatever arrived meanwhile. A prediction therefore waits for at most one
chunk, not for a whole fit of another product.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
from collections import Counter
from collections.abc import Callable, Generator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from app.errors import OverloadedError
from app.metrics import Metrics

log = logging.getLogger(__name__)

T = TypeVar("T")
PREDICT = 0
TRAIN = 1
QUEUE_LABELS = {PREDICT: "predict", TRAIN: "train"}
OOM_RETRY_AFTER_S = 2.0
_STOP = -1  # sorts before every real priority, so stop() does not wait behind queued work


@dataclass(order=True)
class _Task:
    priority: int
    seq: int
    fn: Callable[[], Any] | None = field(compare=False)
    future: Future | None = field(compare=False)
    weight: int = field(compare=False, default=1)
    steps: Generator[Any, None, Any] | None = field(compare=False, default=None)  # ``submit_steps`` work
    started: bool = field(compare=False, default=False)


class DeviceWorker:
    """Runs callables one at a time on a dedicated thread; ``submit`` returns a ``Future``."""

    def __init__(self, metrics: Metrics | None = None, *, name: str = "clipshot-device") -> None:
        self._queue: queue.PriorityQueue[_Task] = queue.PriorityQueue()
        self._seq = itertools.count()
        self._metrics = metrics
        self._name = name
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.tasks_done: Counter[str] = Counter()  # tasks (fit chunks included) run so far, per queue label
        if metrics is not None:  # expose both series at 0 from the start, so dashboards see them
            for label in QUEUE_LABELS.values():
                metrics.queue_depth.labels(label).inc(0)

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Start the worker thread (idempotent)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 30.0) -> None:
        """Finish the running task, cancel queued ones, and join the thread."""
        if self._thread is None:
            return
        self._stopping = True
        self._queue.put(_Task(_STOP, next(self._seq), None, None))
        self._thread.join(timeout)
        self._thread = None
        while True:  # whatever was still queued will never run
            try:
                task = self._queue.get_nowait()
            except queue.Empty:
                break
            self._done(task)
            if task.steps is not None:
                task.steps.close()
            if task.future is not None and not task.future.cancel():  # a chunked task already under way
                task.future.set_exception(OverloadedError("the device worker stopped", retry_after=OOM_RETRY_AFTER_S))

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def on_worker_thread(self) -> bool:
        """True when called from the device thread (used to assert that device state is not raced)."""
        return self._thread is not None and threading.current_thread() is self._thread

    # -- submitting work ---------------------------------------------------------------------
    def submit(self, fn: Callable[[], T], *, priority: int = PREDICT, weight: int = 1) -> Future[T]:
        """Queue ``fn``; ``weight`` is how many items it stands for in the queue-depth gauge (images)."""
        if priority not in QUEUE_LABELS:
            raise ValueError(f"priority must be PREDICT (0) or TRAIN (1), got {priority}")
        future: Future[T] = Future()
        if self._stopping or not self.running:
            future.set_exception(OverloadedError("the device worker is not running", retry_after=OOM_RETRY_AFTER_S))
            return future
        self._gauge(priority, weight)
        self._queue.put(_Task(priority, next(self._seq), fn, future, weight))
        return future

    async def run(self, fn: Callable[[], T], *, priority: int = PREDICT, weight: int = 1) -> T:
        """Await ``fn`` from the event loop; cancelling the await cancels the task if not yet started."""
        return await asyncio.wrap_future(self.submit(fn, priority=priority, weight=weight))

    def submit_steps(self, steps: Generator[Any, None, T], *, priority: int = TRAIN) -> Future[T]:
        """Run the generator one ``next()`` per task, each chunk queued again behind the work that arrived
        meanwhile; the future gets the generator's return value. Every chunk runs on the device thread; a
        generator still queued when the worker stops is closed and its future fails."""
        if priority not in QUEUE_LABELS:
            raise ValueError(f"priority must be PREDICT (0) or TRAIN (1), got {priority}")
        future: Future[T] = Future()
        if self._stopping or not self.running:
            steps.close()
            future.set_exception(OverloadedError("the device worker is not running", retry_after=OOM_RETRY_AFTER_S))
            return future
        self._gauge(priority, 1)
        self._queue.put(_Task(priority, next(self._seq), None, future, 1, steps))
        return future

    async def run_steps(self, steps: Generator[Any, None, T], *, priority: int = TRAIN) -> T:
        """Await ``submit_steps`` from the event loop (a started generator runs on if the await is cancelled)."""
        return await asyncio.wrap_future(self.submit_steps(steps, priority=priority))

    def depth(self) -> int:
        """Tasks waiting (not the running one)."""
        return self._queue.qsize()

    # -- the thread --------------------------------------------------------------------------
    def _gauge(self, priority: int, delta: int) -> None:
        if self._metrics is not None:
            self._metrics.queue_depth.labels(QUEUE_LABELS[priority]).inc(delta)

    def _done(self, task: _Task) -> None:
        if task.priority in QUEUE_LABELS:
            self._gauge(task.priority, -task.weight)

    def _loop(self) -> None:
        while True:
            task = self._queue.get()
            if task.priority == _STOP:
                return
            self._done(task)
            if task.steps is not None:
                self._step(task)
                continue
            assert task.future is not None and task.fn is not None
            if not task.future.set_running_or_notify_cancel():
                continue  # the caller went away before we got to it
            try:
                result = task.fn()
            except torch.cuda.OutOfMemoryError as exc:
                task.future.set_exception(self._overloaded(exc))
            except BaseException as exc:  # the worker must survive any task failure
                task.future.set_exception(exc)
            else:
                task.future.set_result(result)
            self.tasks_done[QUEUE_LABELS[task.priority]] += 1

    def _step(self, task: _Task) -> None:
        """One chunk of a ``submit_steps`` generator; queue the next one unless it finished or failed."""
        assert task.future is not None and task.steps is not None
        if not task.started:
            if not task.future.set_running_or_notify_cancel():
                task.steps.close()  # cancelled before its first chunk
                return
            task.started = True
        try:
            next(task.steps)
        except StopIteration as stop:
            task.future.set_result(stop.value)
        except torch.cuda.OutOfMemoryError as exc:
            task.future.set_exception(self._overloaded(exc))
        except BaseException as exc:  # a generator that raised is finished; the worker goes on
            task.future.set_exception(exc)
        else:
            task.seq = next(self._seq)  # behind everything queued meanwhile at its priority
            self._gauge(task.priority, task.weight)
            self._queue.put(task)
        self.tasks_done[QUEUE_LABELS[task.priority]] += 1

    @staticmethod
    def _overloaded(exc: BaseException) -> OverloadedError:
        """Free the caching allocator so the next (smaller) batch can fit, and tell the client to retry."""
        log.warning("device out of memory: %s", str(exc).splitlines()[0] if str(exc) else "OOM")
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()
        return OverloadedError(
            "The accelerator ran out of memory; retry shortly or send fewer images per request.",
            retry_after=OOM_RETRY_AFTER_S,
            code="device_out_of_memory",
        )
