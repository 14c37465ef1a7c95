"""Dynamic micro-batching: concurrent requests share one backbone forward, whichever products they ask for.

Why: a forward over 16 images costs little more than over 1 on an accelerator, and production
lines send one image at a time from many cameras, each camera a different product. An idle device takes what
is pending at once (a lone request never waits for company that may not come); while a batch is on the
device, images are collected for up to ``max_batch_wait_ms`` or ``max_batch_size`` images, and the batch is
ONE device task: ``ensure_resident`` for each adapter in it + ``Detector.forward_mixed`` (one backbone forward,
per-sample LoRA deltas, per-product scoring; each image keeps the adapter object its request resolved, so a
hot swap mid-window simply means two adapters). A batch holds at most ``adapter_cache_device`` distinct
adapters (they must all be resident at once); more are split into several device tasks. Decoding/preprocessing
happen before ``submit`` and post-processing after, off the event loop, so the device thread only does device
work.

At most ``max_inflight`` collected batches wait for the device at once; while they do, new
images pile up here and form the next (larger) batch, which is what makes batches grow under load.

A forward takes one pixel shape, so a collected batch is split by everything that shapes an image's pixels and
map: the model frame (height, width) and the number of views (tiles). A square product, a native 208x496 product
and a tiled product collected together run as three device tasks; two products of one frame share a forward.

Every submitted image gets an answer: whatever fails inside a device task fails all its images with that
error, an image that waits longer than ``timeout_s`` fails with 503 ``predict_timeout``, and if the collector
task itself ever dies, everything queued fails and new submissions are refused at once (503 ``batcher_failed``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from dataclasses import dataclass, field

import torch

from app.errors import OverloadedError
from app.metrics import BATCH_CATEGORY, Metrics
from app.serving.adapter_cache import AdapterCache
from app.serving.device_worker import PREDICT, DeviceWorker
from clipshot.adapter import Adapter
from clipshot.detector import Detector


@dataclass(frozen=True)
class BatchResult:
    """One image's share of a batch: raw score and model-resolution map, plus where the time went."""

    score: float
    heat: torch.Tensor  # (views * H, W) float32 on CPU, at the model frame's resolution
    batch_size: int
    queue_s: float  # submit -> device task start (collection window + waiting for the device)
    forward_s: float  # residency + forward + copy back, shared by the whole batch


@dataclass
class _Item:
    adapter: Adapter
    pixels: torch.Tensor  # (3, H, W), or (views, 3, H, W) with tiles, on CPU
    label: str
    future: asyncio.Future[BatchResult]
    submitted: float = field(default_factory=time.perf_counter)

    @property
    def shape_key(self) -> tuple:
        """What must be equal for images to share a forward: their pixel shape and the map frame it is scored in."""
        geometry = self.adapter.geometry
        return (tuple(self.pixels.shape), geometry.views_per_image, geometry.frame)


class Batcher:
    """``await submit(adapter, pixels, label)`` -> ``BatchResult``; one collector task per app."""

    def __init__(self, detector: Detector, worker: DeviceWorker, cache: AdapterCache, metrics: Metrics,
                 *, max_batch_size: int, max_wait_ms: float, max_inflight: int = 2,
                 timeout_s: float | None = None) -> None:
        self.detector = detector
        self.worker = worker
        self.cache = cache
        self.metrics = metrics
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_inflight = max_inflight
        self.timeout_s = timeout_s  # None: wait as long as the device takes
        self._pending: collections.deque[_Item] = collections.deque()
        self._wakeup: asyncio.Event | None = None
        self._slots: asyncio.Semaphore | None = None
        self._collector: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        self._inflight = 0  # dispatched batches not finished yet
        self.failure: str | None = None  # why the collector died, if it did: submissions are refused from then on

    async def start(self) -> None:
        """Start the collector on the running loop (the lifespan's)."""
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(self.max_inflight)
        self.failure = None
        self._collector = asyncio.create_task(self._collect(), name="clipshot-batcher")
        self._collector.add_done_callback(self._collector_ended)

    async def stop(self) -> None:
        """Stop collecting and fail whatever is still waiting (the service is shutting down)."""
        if self._collector is not None:
            self._collector.remove_done_callback(self._collector_ended)
            self._collector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._collector
            self._collector = None
        while self._pending:
            self._fail([self._pending.popleft()], OverloadedError("the service is shutting down"))
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def submit(self, adapter: Adapter, pixels: torch.Tensor, label: str) -> BatchResult:
        """Queue one preprocessed image ((3, H, W) or its tiles) and wait for its batch to come back.

        Always returns or raises: a device error, ``timeout_s`` and a dead collector all end the wait."""
        if self.failure is not None:
            raise OverloadedError(f"the batcher stopped: {self.failure}; the service needs a restart",
                                  code="batcher_failed")
        if self._collector is None or self._wakeup is None or self._collector.done():
            raise OverloadedError("the batcher is not running")
        item = _Item(adapter, pixels, label, asyncio.get_running_loop().create_future())
        self._pending.append(item)
        self.metrics.queue_depth.labels("predict").inc()
        self._wakeup.set()
        try:
            return await asyncio.wait_for(item.future, self.timeout_s)
        except TimeoutError:  # wait_for cancelled the future: the collector skips it, a finished forward drops it
            raise OverloadedError(f"no result within {self.timeout_s:g} s (queue and device); retry shortly",
                                  code="predict_timeout") from None

    # -- collector ---------------------------------------------------------------------------
    async def _collect(self) -> None:
        assert self._wakeup is not None and self._slots is not None
        loop = asyncio.get_running_loop()
        while True:
            while not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
            await self._slots.acquire()  # wait while the device already has enough queued
            deadline = loop.time() + (self.max_wait_s if self._inflight else 0.0)
            while len(self._pending) < self.max_batch_size:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
            batch = [self._pending.popleft() for _ in range(min(self.max_batch_size, len(self._pending)))]
            try:
                self.metrics.queue_depth.labels("predict").dec(len(batch))
                live = [item for item in batch if not item.future.done()]  # skip requests that went away
                if not live:
                    self._slots.release()
                    continue
                self._dispatch(live)
            except BaseException as exc:  # images taken off the queue must not be lost with the collector
                self._fail(batch, exc if isinstance(exc, Exception) else OverloadedError("the batcher stopped"))
                raise

    def _collector_ended(self, task: asyncio.Task) -> None:
        """The collector never returns; if it ended anyway (a bug), fail what is queued and refuse new work."""
        exc = None if task.cancelled() else task.exception()
        self.failure = "its collector was cancelled" if exc is None else f"{type(exc).__name__}: {exc}"
        while self._pending:
            self._fail([self._pending.popleft()], OverloadedError(f"the batcher stopped: {self.failure}",
                                                                  code="batcher_failed"))
            self.metrics.queue_depth.labels("predict").dec()

    def _dispatch(self, batch: list[_Item]) -> None:
        """One device task per chunk of the batch; the slot is freed when every chunk has finished."""
        slots = self._slots
        assert slots is not None
        groups = self._chunks(batch)
        remaining = [len(groups)]
        self._inflight += 1

        def finished(_: asyncio.Task) -> None:
            remaining[0] -= 1
            if remaining[0] == 0:
                self._inflight -= 1
                slots.release()

        for group in groups:
            task = asyncio.create_task(self._run_group(group))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            task.add_done_callback(finished)

    def _chunks(self, batch: list[_Item]) -> list[list[_Item]]:
        """The batch as few chunks as shapes and the hot tier allow: one pixel shape and at most
        ``device_capacity`` distinct adapters each."""
        limit = max(1, self.cache.device_capacity)
        per_shape: dict[tuple, dict[str, list[_Item]]] = {}
        for item in batch:
            per_shape.setdefault(item.shape_key, {}).setdefault(item.adapter.uid, []).append(item)
        chunks: list[list[_Item]] = []
        for per_adapter in per_shape.values():
            groups = list(per_adapter.values())
            chunks += [[item for group in groups[i : i + limit] for item in group]
                       for i in range(0, len(groups), limit)]
        return chunks

    async def _run_group(self, group: list[_Item]) -> None:
        """One device task; every image of the group gets its result or the task's error, never nothing."""
        try:
            adapters = [item.adapter for item in group]
            labels = {item.label for item in group}
            label = labels.pop() if len(labels) == 1 else BATCH_CATEGORY
            pixels = torch.stack([item.pixels for item in group])
            if pixels.dtype == torch.uint8 and ships_bytes(self.detector.backbone.device):
                pixels = pixels.pin_memory()  # page-locked: the copy to the device is a real async DMA
            scores, maps, started, forward_s = await self.worker.run(
                lambda: self._device_task(adapters, pixels, label), priority=PREDICT, weight=len(group)
            )
            self.metrics.batch_size.observe(len(group))
            results = [BatchResult(score=float(scores[i]), heat=maps[i], batch_size=len(group),
                                   queue_s=max(0.0, started - item.submitted), forward_s=forward_s)
                       for i, item in enumerate(group)]
        except asyncio.CancelledError:
            self._fail(group, OverloadedError("the service is shutting down"))
            raise
        except BaseException as exc:
            self._fail(group, exc)
            return
        for item, result in zip(group, results, strict=True):
            if not item.future.done():
                item.future.set_result(result)

    def _device_task(self, adapters: list[Adapter], pixels: torch.Tensor,
                     label: str) -> tuple[torch.Tensor, torch.Tensor, float, float]:
        """Runs on the device thread: nothing else touches the backbone or residency meanwhile."""
        started = time.perf_counter()
        with self.metrics.time_stage("forward", label):
            distinct = {a.uid: a for a in adapters}
            for adapter in distinct.values():
                self.cache.ensure_resident(adapter, keep=frozenset(distinct))
            scores, maps = self.detector.forward_mixed(on_device(pixels, self.detector), adapters)
            scores, maps = scores.float().cpu(), maps.float().cpu()
            self.cache.trim_device()
        return scores, maps, started, time.perf_counter() - started

    @staticmethod
    def _fail(items: list[_Item], exc: BaseException) -> None:
        for item in items:
            if not item.future.done():
                item.future.set_exception(exc)


def ships_bytes(device: torch.device) -> bool:
    """Whether preprocessed pixels cross to ``device`` as uint8 (normalised there) instead of float32.

    Why: on a CUDA device the host-to-device copy of a batch is a quarter of the bytes, from page-locked memory,
    and the normalisation is one fused kernel there; on CPU there is no copy to save, so pixels stay float32."""
    return device.type == "cuda"


def on_device(pixels: torch.Tensor, detector: Detector) -> torch.Tensor:
    """A batch as the backbone takes it, on its device: uint8 batches are scaled and normalised after the copy."""
    backbone = detector.backbone
    moved = pixels.to(backbone.device, non_blocking=True)
    if moved.dtype != torch.uint8:
        return moved
    return backbone.normalise(moved.float().div_(255.0))
