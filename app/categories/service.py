"""CategoryService: register products from a few good photos, list/inspect/activate/delete their versions.

Operator edits (threshold policy, feedback, shot removal) live in ``category_edits.py``; which images belong
to a category is read from its active version (``shot_ledger.py``); the checks an upload passes before
anything is written are in ``upload_checks.py``.

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
import contextlib
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import TYPE_CHECKING, Any

from starlette.concurrency import run_in_threadpool

from app.categories import inspection, upload_checks
from app.categories.category_edits import CategoryEdits, stale_conflict
from app.categories.geometry import GeometryRequest
from app.categories.score_evidence import score_evidence
from app.categories.shot_ledger import (
    Ledger,
    adapter_facts,
    current_ledger,
    decode_for_fit,
    memory_coreset,
    new_refs,
    stored_sizes,
    validation_facts,
)
from app.core.advice import chroma, shot_image_facts
from app.core.config import Settings
from app.errors import ConflictError, NotFoundError, OverloadedError
from app.serving.device_worker import TRAIN
from clipshot.adapter import Adapter
from clipshot.calibration import Calibration
from clipshot.chunked import Stage, Steps, reporting, timed
from clipshot.detector import Detector
from clipshot.geometry import Geometry
from model_store import (
    AdapterStore,
    BundleNotFound,
    StaleVersion,
    StoreError,
    VersionNotFound,
)
from model_store.adapters import load_adapter, save_adapter
from model_store.holds import Hold
from model_store.manifest import Manifest

if TYPE_CHECKING:
    from app.jobs.job_runner import JobRunner
    from app.jobs.refit_jobs import RefitProgress

DELETE_WAIT_S = 30.0  # how long DELETE waits for the category's running job to let go of the device


def _object_name(ledger: Ledger) -> str | None:
    """The product description given at the last registration (kept in the adapter config)."""
    return None if ledger.manifest is None else ledger.manifest.adapter.get("object_name")


@dataclass
class Registration:
    """Outcome of ``register``: the version now serving and the fine-tune job started, if any."""

    category: str
    version: int
    job_id: str | None
    shots: int
    added: int
    warnings: list[str] = field(default_factory=list)
    decision: dict[str, Any] | None = None  # Calibration.decision() of the new version: threshold, expected rates
    geometry: dict[str, Any] = field(default_factory=dict)


class CategoryService(CategoryEdits):
    """Product (category) management on top of the adapter store, the device worker and the job runner.

    Every mutation of a category (register, feedback, threshold, shot removal, activate, delete) runs under
    one ``asyncio.Lock`` per category that is never dropped: a DELETE that removed its lock let a request
    still waiting on the old lock recreate the category after a later DELETE had answered. Across processes
    (replicas, the job runner) every version change is also a compare-and-set on the active version under the
    store's file lock, answered 409 ``version_conflict`` when another writer got there first.
    """

    def __init__(self, *, settings: Settings, store: AdapterStore, detector: Detector, device_worker: Any,
                 adapter_cache: Any, job_runner: JobRunner) -> None:
        self.settings, self.store, self.detector = settings, store, detector
        self.worker, self.cache, self.jobs = device_worker, adapter_cache, job_runner
        self._locks: dict[str, asyncio.Lock] = {}
        self._integrity = inspection.IntegrityCache(store)

    # -- helpers ------------------------------------------------------------------------------------
    name = staticmethod(upload_checks.category_name)  # routes validate path names through it

    def _existing(self, category: str) -> str:
        name = self.name(category)
        if not self.store.versions(name):
            raise NotFoundError(f"Unknown category {name!r}; register it with POST /v1/categories/{name}/shots.",
                                code="category_not_found")
        return name

    def _lock(self, category: str) -> asyncio.Lock:
        return self._locks.setdefault(category, asyncio.Lock())

    def sweep_orphans(self) -> dict[str, list[str]]:
        """Start-up: delete image files no version lists (a crash between storing shots and saving the
        version that uses them); they are already invisible, this only frees the disk."""
        swept = {}
        for name in self.store.categories():
            removed = self.store.sweep_orphan_shots(name)
            if removed:
                swept[name] = removed
        return swept

    # -- registration -------------------------------------------------------------------------------
    def validate_upload(self, category: str, files: list[tuple[str, bytes]], *, minimum: int | None = None
                        ) -> tuple[str, list[str], list[tuple[int, int]]]:
        """Checks of the upload itself (``upload_checks.validate_upload``); returns (name, hashes, sizes)."""
        return upload_checks.validate_upload(self.settings, category, files, minimum=minimum)

    def _plan_geometry(self, name: str, ledger: Ledger, sizes: list[tuple[int, int]],
                       request: GeometryRequest) -> Geometry:
        return upload_checks.plan_geometry(self.store, self.detector, self.settings, name, ledger, sizes, request)

    async def check_register(self, category: str, files: list[tuple[str, bytes]],
                             geometry: GeometryRequest | None = None) -> str:
        """Every check ``register`` makes before writing, against the product as it is now (nothing written):
        a registration answered 202 must have failed these with a 4xx instead."""
        name, hashes, sizes = await run_in_threadpool(self.validate_upload, category, files)
        ledger = await run_in_threadpool(current_ledger, self.store, name)
        upload_checks.check_total(self.settings, ledger, hashes)
        await run_in_threadpool(self._plan_geometry, name, ledger, sizes, geometry or GeometryRequest())
        return name

    async def register(self, category: str, files: list[tuple[str, bytes]], *, description: str | None = None,
                       finetune: bool = True, geometry: GeometryRequest | None = None,
                       progress: RefitProgress | None = None) -> Registration:
        """Validate, store the shots, fit + activate the memory adapter over ALL good images, maybe fine-tune.

        ``progress``: a refit job's progress, claimed once the category's lock is held and fed by the fit."""
        name, hashes, sizes = await run_in_threadpool(self.validate_upload, category, files)
        async with self._lock(name):
            if progress is not None:
                await progress.started()
            ledger = await run_in_threadpool(current_ledger, self.store, name)
            notes = upload_checks.check_total(self.settings, ledger, hashes)
            plan = await run_in_threadpool(self._plan_geometry, name, ledger, sizes, geometry or GeometryRequest())
            async with self._holding(name) as held:
                added = await self._store_images(name, files, source="registration", skip=ledger.good_hashes,
                                                 held=held)
                goods = ledger.goods + added
                version, adapter = await self._fit_and_save(name, goods, ledger.defects, base=ledger.manifest,
                                                            through_lora=False, object_name=description, new=added,
                                                            geometry=plan, expect=ledger.active, held=held,
                                                            progress=progress)
        self.cache.invalidate(name)
        job_id = None
        if finetune and not self.detector.backbone.supports_text:
            notes.append(f"fine-tuning skipped: backbone {self.detector.backbone.spec} has no text tower; "
                         "the memory adapter serves this category")
        elif finetune:
            try:
                job_id = (await run_in_threadpool(self.jobs.enqueue, name, {})).id
            except (ConflictError, OverloadedError) as exc:  # busy (a job on the old shots) or shutting down
                notes.append(f"fine-tune not started: {exc} Then start one with POST /v1/categories/{name}/finetune "
                             "so training sees the new shots.")
        decision = None if adapter.calibration is None else adapter.calibration.decision()
        if decision is not None and decision["note"]:
            notes.append(decision["note"])
        return Registration(name, version, job_id, len(goods), len(added), notes, decision,
                            adapter.geometry.to_dict())

    async def _store_images(self, name: str, files: list[tuple[str, bytes]], *, source: str,
                            skip: set[str], held: Hold, **fields: Any) -> list[dict[str, Any]]:
        """Write the bytes (content-addressed) and return manifest refs of the images new to the list.

        The files stay invisible until a version lists them, and ``held`` keeps sweeps off them meanwhile;
        ``_fit_and_save`` removes them again if the fit fails, and a later sweep if the process dies first."""
        stored = await run_in_threadpool(partial(self.store.save_shots, name, files, held=held))
        return new_refs(stored, files, source=source, skip=skip, **fields)

    async def _fit_and_save(self, name: str, goods: list[dict[str, Any]], defects: list[dict[str, Any]], *,
                            base: Manifest | None, through_lora: bool, object_name: str | None = None,
                            new: Sequence[dict[str, Any]] = (), geometry: Geometry | None = None,
                            expect: int | None, held: Hold | None = None,
                            progress: RefitProgress | None = None) -> tuple[int, Adapter]:
        """Fit memory + calibration over ``goods`` (validation on ``defects``) and save it as the active version.

        ``through_lora``: a fine-tuned active version keeps its LoRA and prompts and only re-fits memory and
        calibration through them; otherwise a fresh memory adapter. The decision policy of ``base`` carries
        over (a manual threshold stays manual), and so does its geometry unless ``geometry`` replaces it (a
        registration that plans a new one). The save is a compare-and-set: it activates only if the active
        version is still ``expect`` (409 otherwise). On any failure the files of ``new`` (held by ``held``)
        that no version lists are removed, so a retry starts from the same store."""
        try:
            result = await self._fit(name, goods, defects, base=base, through_lora=through_lora,
                                     object_name=object_name, geometry=geometry, expect=expect, progress=progress)
        except BaseException as exc:
            if held is not None:
                files = [r["name"] for r in new]
                await run_in_threadpool(self.store.forget_shots, name, files, held)
                await run_in_threadpool(self._drop_if_empty, name, files)
            if isinstance(exc, StaleVersion):
                raise stale_conflict(name, exc) from exc
            raise
        await run_in_threadpool(self._tidy, name)
        return result

    async def _fit(self, name: str, goods: list[dict[str, Any]], defects: list[dict[str, Any]], *,
                   base: Manifest | None, through_lora: bool, object_name: str | None,
                   geometry: Geometry | None = None, expect: int | None,
                   progress: RefitProgress | None = None) -> tuple[int, Adapter]:
        s = self.settings
        report = (lambda stage: None) if progress is None else progress.stage
        calibration = None if base is None else base.adapter.get("calibration")
        policy = Calibration.from_dict(calibration).policy_spec() if calibration else None
        if geometry is None and base is not None and base.adapter.get("geometry"):
            geometry = Geometry.from_dict(base.adapter["geometry"])  # re-fits keep the category's geometry
        # images at working size, one full decode at a time; ``working`` is the geometry scaled to them
        report(Stage("decoding images", 0, len(goods) + len(defects)))
        good_images, defect_images, working = await run_in_threadpool(
            decode_for_fit, self.store, name, goods, defects, s, geometry, self.detector.backbone.image_size)
        report(Stage("decoding images", len(goods) + len(defects), len(goods) + len(defects)))
        ratio = memory_coreset(len(good_images), s.max_shots)
        confirmed = [i for i, r in enumerate(goods) if r.get("source") == "feedback"]  # good_images' order
        source = None
        if through_lora and base is not None and base.adapter.get("lora"):
            source, _ = await run_in_threadpool(load_adapter, self.store, self.detector, name, base.version)
            source.uid = uuid.uuid4().hex  # its own peft slot: the serving cache may hold this version's
        object_name = object_name or (None if base is None else base.adapter.get("object_name"))

        def fit() -> Steps[tuple[Adapter, float]]:
            """The fit in bounded device chunks (predictions overtake between them), timed by its own chunks."""
            if source is None:
                steps = self.detector.fit_memory_steps(good_images, category=name, object_name=object_name,
                                                       coreset_ratio=ratio, defects=defect_images, policy=policy,
                                                       geometry=working, confirmed=confirmed)
            else:
                source.geometry = working or source.geometry
                steps = self.detector.refit_memory_steps(source, good_images, coreset_ratio=ratio,
                                                         defects=defect_images, policy=policy, confirmed=confirmed)
            try:
                adapter, seconds = yield from timed(reporting(steps, report))
            finally:
                if source is not None:
                    self.detector.detach(source)
            if geometry is not None:  # the ROI back in full-size pixels: predictions get full-size uploads
                adapter.geometry = replace(adapter.geometry, roi=geometry.roi)
            return adapter, seconds

        adapter, seconds = await self.worker.run_steps(fit(), priority=TRAIN)
        adapter.shot_images = await run_in_threadpool(  # what uploads are compared with (sizes from headers)
            lambda: shot_image_facts(stored_sizes(self.store, name, goods, s), [chroma(i) for i in good_images]))
        kind = "memory" if source is None else "finetuned"
        n_feedback = sum(r.get("source") == "feedback" for r in goods)
        metrics = {**adapter_facts(adapter, kind), "shots": len(goods), "fit_seconds": round(seconds, 3),
                   "coreset_ratio": ratio,
                   "validation": validation_facts(adapter.config()["calibration"], n_feedback, len(defects))}
        fields: dict[str, Any] = {"shots": goods, "validation": defects, "metrics": metrics, "promotable": True}
        report(Stage("saving version", 0, 1))
        if source is not None and base is not None and base.training is not None:
            fields["training"] = base.training.model_dump(mode="json")  # the LoRA it still carries
        version = await run_in_threadpool(save_adapter, self.store, self.detector, adapter, activate=True,
                                          expect_active=expect, **fields)
        report(Stage("saving version", 1, 1))
        return version, adapter

    def _drop_if_empty(self, name: str, files: list[str]) -> None:
        """A category that never got a version loses the folders its failed first fit made (rmdir only: a
        folder that still holds anything, such as another writer's files, stays)."""
        if not files or self.store.versions(name):
            return
        shots = self.store.shot_path(name, files[0]).parent
        with contextlib.suppress(OSError):
            shots.rmdir()
            shots.parent.rmdir()


    # -- fine-tune ----------------------------------------------------------------------------------
    async def finetune(self, category: str, params: dict[str, Any]) -> Any:
        """Queue a fine-tune over the stored shots (404 unknown, 409 non-CLIP backbone or already active).

        Under the category lock, so a DELETE (which cancels the category's jobs while holding it) can never
        be followed by a job queued in between that would write a version into the deleted category."""
        name = await run_in_threadpool(self._existing, category)
        backbone = self.detector.backbone
        if not backbone.supports_text:
            # 409 like zero-shot without CLIP: a valid request the running service's backbone cannot serve
            raise ConflictError(f"fine-tuning needs a CLIP backbone (text tower + LoRA); this service runs "
                                f"{backbone.spec}, which supports the memory adapter only",
                                code="finetune_unsupported")
        async with self._lock(name):
            if not (await self._ledger(name))[1].goods:
                raise ConflictError(f"category {name!r} has no stored shots to train on; upload some first",
                                    code="no_shots")
            return await run_in_threadpool(self.jobs.enqueue, name, {k: v for k, v in params.items()
                                                                     if v is not None})

    # -- inspection ---------------------------------------------------------------------------------
    def summary(self, category: str) -> dict[str, Any]:
        return inspection.summary(self.store, self._existing(category))

    def list_all(self) -> list[dict[str, Any]]:
        return [self.summary(c) for c in self.store.categories() if self.store.versions(c)]

    def scores(self, category: str) -> dict[str, Any]:
        """The active version's score distributions and the versions of its model (``score_evidence``)."""
        return score_evidence(self.store, self._existing(category))

    def detail(self, category: str) -> dict[str, Any]:
        """Summary plus the active decision and each version's key facts from its manifest (no tensors read)."""
        info = self.summary(category)
        return {**inspection.detail(self.store, info, self._integrity),
                "active_job": self.jobs.jobs.active_for(info["category"])}

    # -- mutation -----------------------------------------------------------------------------------
    async def activate(self, category: str, version: int) -> dict[str, Any]:
        """Point the category at an existing version (rollback included) and hot-swap it in."""
        name = await run_in_threadpool(self._existing, category)
        async with self._lock(name):
            before = (await self._ledger(name))[1].active  # a DELETE that held the lock first wins (404)
            try:
                manifest = await run_in_threadpool(self.store.manifest, name, version)
            except (VersionNotFound, BundleNotFound) as exc:
                raise NotFoundError(str(exc), code="version_not_found") from exc
            except StoreError as exc:
                raise ConflictError(f"version {version} of {name!r} is unusable: {exc}",
                                    code="version_corrupt") from exc
            if manifest.backbone.spec != self.detector.backbone.spec:
                raise ConflictError(f"version {version} was built for {manifest.backbone.spec}; this service runs "
                                    f"{self.detector.backbone.spec}", code="backbone_mismatch")
            try:  # the store re-reads the bundle and its tensor checksum before moving the pointer
                await run_in_threadpool(partial(self.store.activate, name, version, expect_active=before))
            except StaleVersion as exc:
                raise stale_conflict(name, exc) from exc
            except (VersionNotFound, BundleNotFound) as exc:
                raise NotFoundError(str(exc), code="version_not_found") from exc
            except StoreError as exc:
                raise ConflictError(f"version {version} of {name!r} is unusable, not activated: {exc}",
                                    code="version_corrupt") from exc
        self.cache.invalidate(name)
        return await run_in_threadpool(self.summary, name)

    async def delete(self, category: str) -> str | None:
        """Under the category lock: cancel its job (and wait for it to let go), then remove everything.

        Holding the lock throughout means a mutation queued behind this DELETE finds the category gone
        (404) or re-creates it only after the DELETE answered, never half-way through."""
        name = self.name(category)
        async with self._lock(name):  # wait for mutations queued earlier (a first registration included)
            await run_in_threadpool(self._existing, name)
            job = await run_in_threadpool(self.jobs.cancel_category, name, timeout=DELETE_WAIT_S)
            if job is not None and job.active:
                raise ConflictError(f"job {job.id} of {name!r} is still stopping; retry the delete shortly",
                                    code="job_still_running")
            try:
                await run_in_threadpool(self.store.delete, name)
            except BundleNotFound as exc:
                raise NotFoundError(str(exc), code="category_not_found") from exc
        self.cache.invalidate(name)
        return None if job is None else job.id
