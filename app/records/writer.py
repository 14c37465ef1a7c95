"""The record's background writer: predictions hand it rows, a thread writes them; retention runs there too.

Why a bounded queue and a drop instead of back-pressure: the record serves audits, the prediction serves the
line, and a slow disk or an unreachable database must cost the line nothing. ``submit`` never blocks; when
``record_queue_size`` inspections are already waiting, the new one is dropped and counted
(``clipshot_records_dropped_total{reason="queue_full"}``, an alert in docker/prometheus/alerts.yml), and a
batch the database refuses is counted with ``reason="write_failed"``. The thread takes what is waiting (up to
``BATCH``) and writes it in one transaction, after writing its images.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from PIL import Image

from app.core.config import Settings
from app.metrics import Metrics
from app.records.images import KeptImages, keep_images
from app.records.inspections import InspectionStore
from app.records.pages import time_text

log = logging.getLogger(__name__)
BATCH = 256  # rows per transaction: one commit per batch amortises the fsync
WRITER_NICE = 10  # how much nicer the writer thread is than the predictions' threads (``_lower_own_priority``)
IDLE_RETENTION_S = 1.0  # shortest sleep between idle retention checks (record_retention_interval_s may be 0)
_STOP = object()


def _lower_own_priority() -> None:
    """Make the calling thread ``WRITER_NICE`` nicer than it is (Linux: a thread id's nice value is its own).

    The writer's picture work is a few milliseconds per inspection, but on a small machine it lands in the middle
    of the backbone's parallel forward, whose worker threads then wait for the core at their barriers: measured on
    2 cores, recording thumbnails at normal priority cost predictions about 10 % more server CPU time. At a lower
    priority the writer runs in the gaps between forwards; it still gets a share of a busy CPU (nice 10 against 0
    is about a tenth), and if it ever falls behind, the bounded queue drops and counts rather than slowing a
    prediction."""
    with contextlib.suppress(AttributeError, OSError):  # not Linux, or not permitted: normal priority it is
        me = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, me, min(19, os.getpriority(os.PRIO_PROCESS, me) + WRITER_NICE))


@dataclass
class Pending:
    """One inspection on its way to the database: its row, and the bytes its images are made from."""

    row: dict[str, Any]
    upload: bytes | None = None
    overlay: str | None = None  # base64, as in the answer: decoded here, off the request path
    overlay_encoding: str | None = None
    picture: Image.Image | None = None  # the upload, decoded and reduced by the prediction (thumbnails mode)
    overlay_picture: Image.Image | None = None  # its overlay, likewise


class RecordWriter:
    """Owns the queue and the writer thread; ``start`` once, ``stop`` at shutdown (it writes what is queued)."""

    def __init__(self, settings: Settings, store: InspectionStore, metrics: Metrics) -> None:
        self.settings = settings
        self.store = store
        self.metrics = metrics
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=settings.record_queue_size)
        self._thread = threading.Thread(target=self._run, name="clipshot-record-writer", daemon=True)
        self._last_retention = 0.0

    @property
    def retention_enabled(self) -> bool:
        s = self.settings
        return bool(s.record_max_age_days or s.record_max_count or s.record_max_image_bytes)

    def start(self) -> None:
        self._thread.start()

    def submit(self, items: list[Pending]) -> int:
        """Queue ``items`` without waiting; returns how many were taken (the rest are dropped and counted)."""
        taken = 0
        for item in items:
            try:
                self._queue.put_nowait(item)
                taken += 1
            except queue.Full:
                self.metrics.records_dropped.labels(reason="queue_full").inc()
        return taken

    def drain(self, timeout: float) -> bool:
        """Wait until everything queued so far is written (tests, shutdown); False if ``timeout`` passed first."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def stop(self, timeout: float = 30.0) -> None:
        """Write what is queued (for at most ``timeout`` s), then end the thread."""
        if not self._thread.is_alive():
            return
        try:
            self._queue.put(_STOP, timeout=timeout)
        except queue.Full:
            log.warning("record writer still busy after %.0f s at shutdown; unwritten inspections are lost", timeout)
            return
        self._thread.join(timeout)

    def _run(self) -> None:
        _lower_own_priority()
        while True:
            wait = max(self.settings.record_retention_interval_s, IDLE_RETENTION_S) if self.retention_enabled else None
            try:
                first = self._queue.get(timeout=wait)
            except queue.Empty:
                self._retain(force=True)
                continue
            batch = [first]
            while len(batch) < BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = any(item is _STOP for item in batch)
            try:
                self._write([item for item in batch if item is not _STOP])
                self._retain(force=False)
            finally:
                for _ in batch:
                    self._queue.task_done()
            if stop:
                return

    def _write(self, batch: list[Pending]) -> None:
        if not batch:
            return
        kept: list[KeptImages] = []
        try:
            for item in batch:
                images = keep_images(self.store.image_dir, mode=self.settings.record_mode,
                                     category=item.row["category"], upload=item.upload,
                                     overlay=base64.b64decode(item.overlay) if item.overlay else None,
                                     overlay_encoding=item.overlay_encoding,
                                     thumbnail_size=self.settings.record_thumbnail_size,
                                     decoded=item.picture, decoded_overlay=item.overlay_picture)
                kept.append(images)
                item.row.update(image_path=images.image_path, overlay_path=images.overlay_path,
                                image_bytes=images.image_bytes)
            self.store.insert([item.row for item in batch])
        except Exception:
            log.exception("could not record %d inspection(s); they are dropped", len(batch))
            self.metrics.records_dropped.labels(reason="write_failed").inc(len(batch))
            for images in kept:
                for name in (images.image_path, images.overlay_path):
                    if name:
                        with contextlib.suppress(OSError):
                            (self.store.image_dir / name).unlink()

    def _retain(self, *, force: bool) -> None:
        """Apply the retention settings, at most every ``record_retention_interval_s`` unless ``force``d."""
        s = self.settings
        if not self.retention_enabled:
            return
        now = time.monotonic()
        if not force and now - self._last_retention < s.record_retention_interval_s:
            return
        self._last_retention = now
        try:
            if s.record_max_age_days:
                self.store.expire(time_text(datetime.now(UTC) - timedelta(days=s.record_max_age_days)))
            if s.record_max_count:
                self.store.trim_count(s.record_max_count)
            if s.record_max_image_bytes:
                self.store.trim_bytes(s.record_max_image_bytes)
        except Exception:  # the next pass tries again; the record's readers are unaffected
            log.exception("inspection record retention failed")
