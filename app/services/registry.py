"""CategoryService: register products from a few good photos, list/inspect/activate/delete their versions.

Why registration fits the memory adapter synchronously: it needs no training, so the product serves the
moment the 201 returns; the (optional) fine-tune then runs as a background job and hot-swaps itself in only
if it beats that adapter. Every input is validated before anything is written, so a rejected upload leaves
the store byte-for-byte unchanged.

Wiring (what ``app.main`` must pass; needs the ``JobRunner`` first)::

    categories = CategoryService(settings=settings, store=adapter_store, detector=detector,
                                 device_worker=device_worker, adapter_cache=adapter_cache, job_runner=runner)
    app.state.category_service = categories
"""

from __future__ import annotations

import asyncio
import time
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from starlette.concurrency import run_in_threadpool

from app.core.config import Settings
from app.errors import BadRequestError, ClipshotHTTPError, ConflictError, NotFoundError, OverloadedError
from app.services.device_worker import TRAIN
from app.services.geometry import GeometryRequest
from app.services.images import decode_image
from clipshot.adapter import Adapter
from clipshot.detector import Detector
from clipshot.geometry import Geometry
from model_store import AdapterStore, BundleNotFound, InvalidName, StoreError, VersionNotFound, validate_category
from model_store.adapters import save_adapter

if TYPE_CHECKING:
    from PIL import Image

    from app.services.job_runner import JobRunner

DELETE_WAIT_S = 30.0  # how long DELETE waits for the category's running job to let go of the device


def adapter_facts(adapter: Adapter, kind: str) -> dict[str, Any]:
    """What listings need about a bundle without loading its tensors (kept in the manifest's metrics)."""
    return {"kind": kind, "branches": adapter.branches, "lora": adapter.lora is not None,
            "threshold": adapter.threshold}


def load_shots(store: AdapterStore, category: str, settings: Settings, *,
               decode: bool = True) -> tuple[list[Image.Image], list[dict[str, str]], str | None]:
    """(images, manifest shot refs, object name) of a category's stored shots; files are ``<sha256><ext>``."""
    paths = store.shot_paths(category)
    refs = [{"name": p.name, "sha256": p.name.split(".", 1)[0]} for p in paths]
    images = [decode_image(p.read_bytes(), max_pixels=settings.max_image_pixels,
                           max_bytes=settings.max_upload_bytes).image for p in paths] if decode else []
    return images, refs, _object_name(store, category)


def _object_name(store: AdapterStore, category: str) -> str | None:
    """The product description given at the last registration (kept in the adapter config)."""
    try:
        return store.manifest(category).adapter.get("object_name")
    except StoreError:
        return None


@dataclass
class Registration:
    """Outcome of ``register``: the version now serving and the fine-tune job started, if any."""

    category: str
    version: int
    job_id: str | None
    shots: int
    added: int
    warnings: list[str] = field(default_factory=list)
    geometry: dict[str, Any] = field(default_factory=dict)


class CategoryService:
    """Product (category) management on top of the adapter store, the device worker and the job runner."""

    def __init__(self, *, settings: Settings, store: AdapterStore, detector: Detector, device_worker: Any,
                 adapter_cache: Any, job_runner: JobRunner) -> None:
        self.settings, self.store, self.detector = settings, store, detector
        self.worker, self.cache, self.jobs = device_worker, adapter_cache, job_runner
        self._locks: dict[str, asyncio.Lock] = {}

    # -- helpers ------------------------------------------------------------------------------------
    @staticmethod
    def name(category: str) -> str:
        """Validated category slug, or 400 before the name ever touches a path."""
        try:
            return validate_category(category)
        except InvalidName as exc:
            raise BadRequestError(str(exc), code="invalid_category") from exc

    def _existing(self, category: str) -> str:
        name = self.name(category)
        if not (self.store.versions(name) or self.store.shot_paths(name)):
            raise NotFoundError(f"Unknown category {name!r}; register it with POST /v1/categories/{name}/shots.",
                                code="category_not_found")
        return name

    def _lock(self, category: str) -> asyncio.Lock:
        return self._locks.setdefault(category, asyncio.Lock())

    # -- registration -------------------------------------------------------------------------------
    def validate_upload(self, category: str, files: list[tuple[str, bytes]]
                        ) -> tuple[str, list[str], list[tuple[int, int]]]:
        """Checks of the upload itself (name, counts, every image); returns (name, content hashes, sizes)."""
        name = self.name(category)
        s = self.settings
        if len(files) < s.min_shots:
            raise BadRequestError(f"too few shots: got {len(files)}, need at least {s.min_shots}",
                                  code="too_few_shots")
        if len(files) > s.max_shots:
            raise BadRequestError(f"too many shots: got {len(files)}, at most {s.max_shots} per upload",
                                  code="too_many_shots")
        hashes, sizes = [], []
        for filename, data in files:
            try:
                decoded = decode_image(data, max_pixels=s.max_image_pixels, max_bytes=s.max_upload_bytes)
            except ClipshotHTTPError as exc:  # name the offending file: uploads hold up to 16 of them
                exc.message = f"{filename or 'unnamed file'}: {exc.message}"
                raise
            hashes.append(decoded.sha256)
            sizes.append(decoded.size)
        return name, hashes, sizes

    def _plan_geometry(self, name: str, sizes: list[tuple[int, int]], request: GeometryRequest) -> Geometry:
        """The geometry for all the category's shots (stored + new), checked before anything is written."""
        stored_images, _, _ = load_shots(self.store, name, self.settings)
        try:
            stored = Geometry.from_dict(self.store.manifest(name).adapter.get("geometry"))
        except (StoreError, ValueError, TypeError):
            stored = None
        return request.plan(self.detector, [img.size for img in stored_images] + sizes, stored)

    def _check_total(self, name: str, hashes: list[str]) -> list[str]:
        """The category-wide limit (stored + new, deduplicated); checked under the category lock."""
        s = self.settings
        stored = {p.name.split(".", 1)[0] for p in self.store.shot_paths(name)}
        total = len(stored | set(hashes))
        if total > s.max_shots:
            raise BadRequestError(
                f"too many shots: {name!r} would hold {total} distinct shots, at most {s.max_shots}; "
                f"delete the category and register the {s.max_shots} most representative photos",
                code="too_many_shots")
        notes = []
        if len(set(hashes)) < len(hashes):
            notes.append(f"{len(hashes) - len(set(hashes))} duplicate image(s) in the upload were stored once")
        if total < s.recommended_min_shots:
            notes.append(f"only {total} shot(s); {s.recommended_min_shots}-{s.max_shots} good photos give reliable "
                         "thresholds (and fine-tuning needs at least 4 to validate itself)")
        return notes

    async def register(self, category: str, files: list[tuple[str, bytes]], *, description: str | None = None,
                       finetune: bool = True, geometry: GeometryRequest | None = None) -> Registration:
        """Validate, store the shots, fit + activate the memory adapter over ALL shots, maybe queue a fine-tune."""
        name, hashes, sizes = await run_in_threadpool(self.validate_upload, category, files)
        async with self._lock(name):
            notes = self._check_total(name, hashes)
            plan = await run_in_threadpool(self._plan_geometry, name, sizes, geometry or GeometryRequest())
            before = {p.name for p in self.store.shot_paths(name)}
            stored = await run_in_threadpool(self.store.save_shots, name, files)
            added = sorted(set(stored) - before)
            try:
                version, total = await self._fit_memory_version(name, description, plan)
            except BaseException:
                await run_in_threadpool(self._forget_shots, name, added)
                raise
        self.cache.invalidate(name)
        job_id = None
        if finetune and not self.detector.backbone.supports_text:
            notes.append(f"fine-tuning skipped: backbone {self.detector.backbone.spec} has no text tower; "
                         "the memory adapter serves this category")
        elif finetune:
            try:
                job_id = self.jobs.enqueue(name, {}).id
            except (ConflictError, OverloadedError) as exc:  # busy (a job on the old shots) or shutting down
                notes.append(f"fine-tune not started: {exc} Then start one with POST /v1/categories/{name}/finetune "
                             "so training sees the new shots.")
        return Registration(name, version, job_id, total, len(added), notes, plan.to_dict())

    async def _fit_memory_version(self, name: str, description: str | None,
                                  geometry: Geometry | None = None) -> tuple[int, int]:
        images, refs, previous = await run_in_threadpool(load_shots, self.store, name, self.settings)
        object_name = description or previous

        def fit() -> tuple[Adapter, float]:
            started = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the shot-count warning is in the response instead
                adapter = self.detector.fit_memory(images, category=name, object_name=object_name,
                                                   geometry=geometry)
            return adapter, time.perf_counter() - started

        adapter, seconds = await self.worker.run(fit, priority=TRAIN)
        metrics = {**adapter_facts(adapter, "memory"), "shots": len(refs), "fit_seconds": round(seconds, 3)}
        version = await run_in_threadpool(save_adapter, self.store, self.detector, adapter, activate=True,
                                          shots=refs, metrics=metrics, promotable=True)
        return version, len(refs)

    def _forget_shots(self, name: str, added: list[str]) -> None:
        """Undo this request's new shot files after a failed fit, so a retry starts from the same store."""
        for path in self.store.shot_paths(name):
            if path.name in added:
                path.unlink(missing_ok=True)

    # -- fine-tune ----------------------------------------------------------------------------------
    def finetune(self, category: str, params: dict[str, Any]) -> Any:
        """Queue a fine-tune over the stored shots (404 unknown, 400 non-CLIP backbone, 409 already active)."""
        name = self._existing(category)
        backbone = self.detector.backbone
        if not backbone.supports_text:
            raise BadRequestError(f"fine-tuning needs a CLIP backbone (text tower + LoRA); this service runs "
                                  f"{backbone.spec}, which supports the memory adapter only",
                                  code="finetune_unsupported")
        if not self.store.shot_paths(name):
            raise ConflictError(f"category {name!r} has no stored shots to train on; upload some first",
                                code="no_shots")
        return self.jobs.enqueue(name, {k: v for k, v in params.items() if v is not None})

    # -- inspection ---------------------------------------------------------------------------------
    def summary(self, category: str) -> dict[str, Any]:
        name = self._existing(category)
        try:
            active = self.store.active_version(name)
        except StoreError:
            active = None
        return {"category": name, "active_version": active, "versions": self.store.versions(name),
                "shots": len(self.store.shot_paths(name))}

    def list_all(self) -> list[dict[str, Any]]:
        return [self.summary(c) for c in self.store.categories()]

    def detail(self, category: str) -> dict[str, Any]:
        """Summary plus each version's key facts from its manifest (no tensors are read)."""
        info = self.summary(category)
        info["versions"] = [self._version_facts(info["category"], v, info["active_version"])
                            for v in info["versions"]]
        info["active_job"] = self.jobs.jobs.active_for(info["category"])
        return info

    def _version_facts(self, name: str, version: int, active: int | None) -> dict[str, Any]:
        facts: dict[str, Any] = {"version": version, "active": version == active}
        try:
            m = self.store.manifest(name, version)
        except StoreError as exc:
            return {**facts, "error": str(exc)}
        return {**facts, "created": m.created, "promotable": m.promotable,
                "kind": m.metrics.get("kind", "finetuned" if m.adapter.get("lora") else "memory"),
                "branches": m.metrics.get("branches", []), "object_name": m.adapter.get("object_name"),
                "shots": len(m.shots), "metrics": m.metrics,
                "training_seconds": None if m.training is None else m.training.seconds,
                "backbone": m.backbone.spec, "geometry": m.adapter.get("geometry")}

    # -- mutation -----------------------------------------------------------------------------------
    async def activate(self, category: str, version: int) -> dict[str, Any]:
        """Point the category at an existing version (rollback included) and hot-swap it in."""
        name = self._existing(category)
        try:
            manifest = self.store.manifest(name, version)
        except (VersionNotFound, BundleNotFound) as exc:
            raise NotFoundError(str(exc), code="version_not_found") from exc
        except StoreError as exc:
            raise ConflictError(f"version {version} of {name!r} is unusable: {exc}", code="version_corrupt") from exc
        if manifest.backbone.spec != self.detector.backbone.spec:
            raise ConflictError(f"version {version} was built for {manifest.backbone.spec}; this service runs "
                                f"{self.detector.backbone.spec}", code="backbone_mismatch")
        async with self._lock(name):
            await run_in_threadpool(self.store.activate, name, version)
        self.cache.invalidate(name)
        return self.summary(name)

    async def delete(self, category: str) -> str | None:
        """Cancel the category's job (and wait for it to let go), then remove everything; returns the job id."""
        name = self._existing(category)
        job = await run_in_threadpool(self.jobs.cancel_category, name, timeout=DELETE_WAIT_S)
        if job is not None and job.active:
            raise ConflictError(f"job {job.id} of {name!r} is still stopping; retry the delete shortly",
                                code="job_still_running")
        async with self._lock(name):
            try:
                await run_in_threadpool(self.store.delete, name)
            except BundleNotFound as exc:
                raise NotFoundError(str(exc), code="category_not_found") from exc
        self.cache.invalidate(name)
        self._locks.pop(name, None)
        return None if job is None else job.id
