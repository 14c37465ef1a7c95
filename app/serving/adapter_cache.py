"""Two-tier LRU of adapters: resident on the device (hot) and in host memory (warm), above the store.

Why: loading a bundle means reading and checksumming files; attaching a LoRA means injecting
modules into the shared backbone. Both are far too slow per request, and device memory only holds
a few products at a time. Lookups resolve the *active* version on every call (one small file
read), so activating a new version is picked up by the next request while requests that already
hold the old ``Adapter`` object finish on it: the object stays valid even after eviction (it is
simply made resident again inside its own device task).

Both tiers are bounded by count and by bytes (an adapter's bytes: its memory bank, text embeddings and LoRA
tensors, ``Adapter.nbytes``): a count alone lets a few products with large banks (many shots, tiles, big
frames) fill the device or the host.

Threading: ``get*`` run on request threads (threadpool); ``ensure_resident``/``trim_device`` run only
inside device-worker tasks, so residency never changes under a running batch.
"""

from __future__ import annotations

import itertools
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future

import torch

from app.errors import BadRequestError, ClipshotHTTPError, ConflictError, NotFoundError
from app.metrics import Metrics
from app.serving.device_worker import PREDICT, DeviceWorker
from clipshot.adapter import Adapter
from clipshot.detector import Detector
from model_store import (
    AdapterStore,
    BackboneMismatch,
    BundleCorrupt,
    BundleNotFound,
    ConcurrentModification,
    InvalidInput,
    InvalidName,
    StoreError,
    VersionNotFound,
)
from model_store.adapters import load_adapter, load_generic_adapter
from model_store.manifest import Manifest

Key = tuple[str, ...]
GENERIC = "generic"
ZERO_SHOT_LABEL = "zero-shot"  # metrics label for handcrafted-text adapters (object names are unbounded)


def store_error(exc: Exception, what: str) -> ClipshotHTTPError:
    """One mapping from store/compatibility failures to HTTP errors, with the store's own advice."""
    if isinstance(exc, InvalidName):
        return BadRequestError(str(exc), code="invalid_category")
    if isinstance(exc, VersionNotFound):
        return NotFoundError(f"{what}: {exc}", code="version_not_found")
    if isinstance(exc, BundleNotFound):
        return NotFoundError(f"{what} has no adapter: {exc}", code="category_not_found")
    if isinstance(exc, BackboneMismatch | ValueError) and not isinstance(exc, InvalidInput):
        return ConflictError(f"{what} cannot run on this service's backbone: {exc}", code="backbone_mismatch")
    if isinstance(exc, ConcurrentModification):
        return ConflictError(f"{what} changed while loading; retry: {exc}", code="concurrent_modification")
    if isinstance(exc, InvalidInput):
        return BadRequestError(f"{what}: {exc}")
    if isinstance(exc, BundleCorrupt):
        return ClipshotHTTPError(f"{what}'s bundle is unreadable: {exc}", code="bundle_corrupt")
    return ClipshotHTTPError(f"{what} could not be loaded: {exc}", code="store_error")


class AdapterCache:
    """``get(category)`` -> the active version's ``Adapter``, cached; device residency managed in worker tasks."""

    def __init__(self, store: AdapterStore, detector: Detector, metrics: Metrics, worker: DeviceWorker,
                 *, device_capacity: int, cpu_capacity: int, device_bytes: int = 0, cpu_bytes: int = 0,
                 prepare: Callable[[Adapter, Manifest], None] | None = None) -> None:
        """``*_capacity``: adapters per tier; ``*_bytes``: bytes per tier (0: no byte bound); ``prepare``: run on
        each category bundle loaded, before it serves (``app.serving.int8_graphs``: its int8 graph)."""
        self.prepare = prepare
        self.store = store
        self.detector = detector
        self.metrics = metrics
        self.worker = worker
        self.device_capacity = device_capacity
        self.cpu_capacity = cpu_capacity
        self.device_bytes = device_bytes
        self.cpu_bytes = cpu_bytes
        self._lock = threading.Lock()
        self._entries: OrderedDict[Key, Adapter] = OrderedDict()  # everything loaded, LRU order
        self._resident: OrderedDict[str, Adapter] = OrderedDict()  # uid -> adapter on the device
        self._loading: dict[Key, Future[Adapter]] = {}
        self._slot = itertools.count(1)
        self._gauges()

    # -- lookups (request threads) -------------------------------------------------------------
    def get(self, category: str, version: int | None = None) -> Adapter:
        """The adapter for ``category`` (default: its active version), loading it on a miss."""
        what = f"category {category!r}"
        try:
            resolved = version if version is not None else self.store.active_version(category)
        except StoreError as exc:
            raise store_error(exc, what) from exc
        if resolved is None:
            raise NotFoundError(
                f"{what} does not exist or has no active adapter version; register it first.",
                code="category_not_found",
            )
        return self._cached(("category", category, str(resolved)), what, lambda: self._load(category, resolved))

    def _load(self, category: str, version: int) -> Adapter:
        adapter, manifest = load_adapter(self.store, self.detector, category, version)
        if self.prepare is not None:
            self.prepare(adapter, manifest)
        return adapter

    def get_generic(self) -> Adapter:
        """The active generic (zero-shot, object-agnostic) bundle; 404 when none was saved."""
        try:
            version = self.store.generic.active_version()
        except StoreError as exc:
            raise store_error(exc, "the generic bundle") from exc
        if version is None:
            raise NotFoundError("no generic zero-shot bundle is stored", code="generic_not_found")
        return self._cached(("generic", str(version)), "the generic bundle",
                            lambda: load_generic_adapter(self.store, self.detector, version)[0])

    def get_text(self, object_name: str | None) -> Adapter:
        """Handcrafted-prompt adapter for ``object_name`` (None = object-agnostic); text encoding runs on the device."""
        def build() -> Adapter:
            future = self.worker.submit(
                lambda: self.detector.text_adapter(category=ZERO_SHOT_LABEL, object_name=object_name),
                priority=PREDICT,
            )
            adapter = future.result()
            _move(adapter, torch.device("cpu"))  # built on the device; cached in the CPU tier until used
            return adapter
        return self._cached(("text", object_name or ""), "the handcrafted zero-shot adapter", build)

    def invalidate(self, category: str) -> None:
        """Forget every cached version of ``category`` (call after delete or re-registration)."""
        with self._lock:
            stale = [key for key in self._entries if key[:2] == ("category", category)]
            dropped = [self._entries.pop(key) for key in stale]
        self._gauges()
        uids = {a.uid for a in dropped}
        if uids and self.worker.running:
            self.worker.submit(lambda: self._drop_resident(uids), priority=PREDICT)

    def _cached(self, key: Key, what: str, load: Callable[[], Adapter]) -> Adapter:
        """Single-flight load: concurrent misses on one key share one load."""
        with self._lock:
            adapter = self._entries.get(key)
            if adapter is not None:
                self._entries.move_to_end(key)
                self.metrics.adapter_cache_hits.labels("cpu").inc()
                return adapter
            pending = self._loading.get(key)
            owner = pending is None
            if owner:
                pending = self._loading[key] = Future()
                self.metrics.adapter_cache_misses.labels("cpu").inc()
        assert pending is not None
        if not owner:
            return pending.result()
        try:
            start = time.perf_counter()
            try:
                adapter = load()
            except (StoreError, ValueError) as exc:
                raise store_error(exc, what) from exc
            adapter.uid = self._safe_uid(key)
            self.metrics.adapter_load.observe(time.perf_counter() - start)
        except BaseException as exc:
            with self._lock:
                self._loading.pop(key, None)
            pending.set_exception(exc)
            raise
        with self._lock:
            self._loading.pop(key, None)
            self._entries[key] = adapter
            self._trim_cpu()
        self._gauges()
        pending.set_result(adapter)
        return adapter

    def _safe_uid(self, key: Key) -> str:
        """LoRA module names may not contain '.', and category 'generic' must not clash with the generic bundle."""
        return f"a{next(self._slot)}_" + re.sub(r"[^A-Za-z0-9_]", "_", "_".join(key))

    def _trim_cpu(self) -> None:
        """Drop least-recently-used host entries beyond the tier's count or bytes (never ones resident on the
        device; the newest goes last, and alone over the byte bound it goes too: served, not kept)."""
        while self._cpu_count() > self.cpu_capacity or _over(self._cpu_bytes(), self.cpu_bytes):
            victim = next((k for k, a in self._entries.items() if a.uid not in self._resident), None)
            if victim is None:
                return
            del self._entries[victim]
            self.metrics.adapter_cache_evictions.labels("cpu").inc()

    def _cpu_count(self) -> int:
        return sum(1 for a in self._entries.values() if a.uid not in self._resident)

    def _cpu_bytes(self) -> int:
        return sum(a.nbytes for a in self._entries.values() if a.uid not in self._resident)

    def _device_bytes(self) -> int:
        return sum(a.nbytes for a in self._resident.values())

    # -- residency (device worker only) --------------------------------------------------------
    def ensure_resident(self, adapter: Adapter, keep: frozenset[str] = frozenset()) -> None:
        """Attach the LoRA and move memory/text tensors to the device, first evicting least-recently-used
        resident adapters until it fits the tier's count and bytes; ``keep``: uids never evicted for it (the
        rest of the batch being served)."""
        with self._lock:
            if adapter.uid in self._resident:
                self._resident.move_to_end(adapter.uid)
                self.metrics.adapter_cache_hits.labels("device").inc()
                return
            self.metrics.adapter_cache_misses.labels("device").inc()
        self.trim_device(max(0, self.device_capacity - 1), room=adapter.nbytes, keep=keep)
        try:
            self.detector.attach(adapter)
            _move(adapter, self.detector.backbone.device)
        except BaseException:  # e.g. device OOM: leave nothing half-resident that a later hit would trust
            self._evict(adapter)
            raise
        with self._lock:
            self._resident[adapter.uid] = adapter
        self._gauges()

    def trim_device(self, capacity: int | None = None, *, room: int = 0, keep: frozenset[str] = frozenset()) -> None:
        """Evict least-recently-used resident adapters until at most ``capacity`` remain and ``room`` more bytes
        fit the byte bound; never one in ``keep``, and never the most recently used one for bytes alone (the
        batch just served needs it, however large)."""
        limit = self.device_capacity if capacity is None else capacity
        while True:
            with self._lock:
                over_count = len(self._resident) > limit
                over_bytes = _over(self._device_bytes() + room, self.device_bytes) and \
                    len(self._resident) > (0 if room else 1)
                victim = next((a for uid, a in self._resident.items() if uid not in keep), None)
                if not (over_count or over_bytes) or victim is None:
                    break
                del self._resident[victim.uid]
                self.metrics.adapter_cache_evictions.labels("device").inc()
            self._evict(victim)
        with self._lock:
            self._trim_cpu()
        self._gauges()

    def _evict(self, adapter: Adapter) -> None:
        self.detector.detach(adapter)
        _move(adapter, torch.device("cpu"))

    def _drop_resident(self, uids: set[str]) -> None:
        with self._lock:
            victims = [self._resident.pop(uid) for uid in uids if uid in self._resident]
        for adapter in victims:
            self._evict(adapter)
        self._gauges()

    def clear(self) -> None:
        """Detach everything (device worker only); used at shutdown."""
        self._drop_resident(set(self._resident))
        with self._lock:
            self._entries.clear()
        self._gauges()

    # -- introspection -------------------------------------------------------------------------
    def stats(self) -> dict[str, int]:
        """Adapters per tier."""
        with self._lock:
            return {"device": len(self._resident), "cpu": self._cpu_count()}

    def bytes_held(self) -> dict[str, int]:
        """Bytes of the adapters per tier."""
        with self._lock:
            return {"device": self._device_bytes(), "cpu": self._cpu_bytes()}

    def _gauges(self) -> None:
        for tier, count in self.stats().items():
            self.metrics.adapters_resident.labels(tier).set(count)
        for tier, size in self.bytes_held().items():
            self.metrics.adapter_cache_bytes.labels(tier).set(size)


def _over(size: int, budget: int) -> bool:
    """Past a byte bound (0: none)."""
    return budget > 0 and size > budget


def _move(adapter: Adapter, device: torch.device) -> None:
    """Memory bank, cached text embeddings and the position baseline follow the adapter between tiers."""
    if adapter.memory is not None:
        adapter.memory.to(device)
    if adapter.text is not None:
        adapter.text = adapter.text.to(device)
    if adapter.baseline is not None:
        adapter.baseline = adapter.baseline.to(device)
