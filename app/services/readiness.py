"""Readiness probe: a real (tiny) forward pass through the device worker, cached for a few seconds.

Why not just "the model object exists": a wedged device thread, a lost GPU or a broken driver all
leave the object in place. Running ``backbone.extract`` on a synthetic image exercises the same
queue, thread and kernels as a prediction, without needing any adapter or memory bank. The result
is cached so a tight probe interval cannot steal device time from the production line.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from app.services.device_worker import PREDICT, DeviceWorker
from clipshot.backbone import Backbone

CACHE_SECONDS = 5.0
PROBE_TIMEOUT_S = 10.0
PROBE_SIZE = 1  # images in the probe batch


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    checked_at: float  # time.monotonic()
    detail: str | None = None


class ReadinessProbe:
    """``await check()`` -> cached ``ProbeResult``; only successes are cached, failures are retried."""

    def __init__(self, backbone: Backbone, worker: DeviceWorker, *, cache_seconds: float = CACHE_SECONDS,
                 timeout_s: float = PROBE_TIMEOUT_S, broken: Callable[[], str | None] | None = None) -> None:
        self.backbone = backbone
        self.worker = worker
        # why predictions cannot run although the device answers (the batcher's collector died), or None
        self.broken = broken or (lambda: None)
        self.cache_seconds = cache_seconds
        self.timeout_s = timeout_s
        self._last: ProbeResult | None = None
        self._lock = asyncio.Lock()

    async def check(self) -> ProbeResult:
        """Serve the cached success if fresh; otherwise run one probe (concurrent callers share it)."""
        async with self._lock:
            if (reason := self.broken()) is not None:  # a replica that refuses every predict must leave the pool
                self._last = ProbeResult(False, time.monotonic(), reason)
                return self._last
            last = self._last
            if last is not None and last.ok and time.monotonic() - last.checked_at < self.cache_seconds:
                return last
            try:
                await asyncio.wait_for(self.worker.run(self._probe, priority=PREDICT), self.timeout_s)
                self._last = ProbeResult(True, time.monotonic())
            except TimeoutError:
                self._last = ProbeResult(False, time.monotonic(), f"device probe took over {self.timeout_s:.0f} s")
            except Exception as exc:  # any failure means "do not route traffic here"
                self._last = ProbeResult(False, time.monotonic(), f"device probe failed: {type(exc).__name__}: {exc}")
            return self._last

    def _probe(self) -> None:
        size = self.backbone.image_size
        with torch.inference_mode():
            pixels = torch.zeros(PROBE_SIZE, 3, size, size, device=self.backbone.device)
            features = self.backbone.extract(pixels)
            if not features.patches or not torch.isfinite(features.patches[-1]).all():
                raise RuntimeError("backbone produced no or non-finite features")
