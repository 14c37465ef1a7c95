"""What an operator changes on a registered product: its threshold policy, feedback, and its shot list.

Why each change is a new version: the line must be able to see which decision rule judged a part and go
back to it (activate = rollback). A threshold change only rewrites the manifest (the calibration evidence is
stored, ``apply_policy`` recomputes the threshold and expected rates from it; tensors are copied byte for
byte). Feedback and shot removal re-fit memory and calibration over the new image set. Everything is checked
before anything is written, so a refused request leaves the store unchanged.

Every new version is a compare-and-set on the active version the edit was computed from (under the store's
file lock, so it holds across replicas and against the job runner): a lost race answers 409
``version_conflict`` with ``Retry-After`` and writes nothing. After each new version the category is tidied:
versions beyond ``CLIPSHOT_KEEP_VERSIONS`` (never the active, a pinned or a held one) and shot files no
version lists and no live writer holds are removed.

``CategoryService`` (``app/categories/service.py``) mixes this in; it provides the lock, ``_existing``,
``validate_upload``, ``_store_images`` and ``_fit_and_save``.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import AsyncIterator, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

from starlette.concurrency import run_in_threadpool

from app.categories.geometry import GeometryRequest
from app.categories.shot_ledger import Ledger, current_ledger, validation_facts
from app.core.advice import decision_warnings
from app.errors import BadRequestError, ConflictError, NotFoundError
from clipshot.calibration import Calibration, DecisionPolicy, apply_policy
from model_store import CATEGORY_NAME, StaleVersion, StoreError, VersionNotFound
from model_store.holds import Hold

if TYPE_CHECKING:
    import asyncio

    from app.core.config import Settings
    from app.jobs.refit_jobs import RefitProgress
    from model_store import AdapterStore

log = logging.getLogger(__name__)

LABELS = ("good", "defect")
SHA256 = re.compile(r"^[0-9a-f]{64}$")
_PRINTABLE_NOTE = re.compile(r"^[^\x00-\x1f\x7f-\x9f]*$")  # printable text: no control characters at all


def check_feedback_fields(label: str, defect_type: str | None, note: str | None) -> None:
    """400 for a label other than good/defect, a defect type that is no slug, or a note with control chars."""
    if label not in LABELS:
        raise BadRequestError(f"label must be 'good' (a false alarm) or 'defect' (a confirmed or missed defect), "
                              f"got {label!r}", code="invalid_label")
    if defect_type is not None:
        if label != "defect":
            raise BadRequestError("defect_type is only allowed with label 'defect'", code="invalid_defect_type")
        if not CATEGORY_NAME.fullmatch(defect_type):
            raise BadRequestError(f"invalid defect_type {defect_type!r}: use 1-64 chars of a-z, 0-9, '.', '_', "
                                  "'-', starting with a letter or digit", code="invalid_defect_type")
    if note is not None and (len(note) > 500 or not _PRINTABLE_NOTE.fullmatch(note)):
        raise BadRequestError("note must be at most 500 printable characters (no control characters)",
                              code="invalid_note")


def stale_conflict(name: str, exc: StaleVersion) -> ConflictError:
    """409 for a lost compare-and-set: the request was computed from a version that no longer serves."""
    now = "no version" if exc.actual is None else f"v{exc.actual}"
    return ConflictError(f"the active version of {name!r} changed to {now} while this request ran (another "
                         "replica, operator or fine-tune job changed it); nothing was activated and no images were "
                         "kept. Retry the request: it will apply to the version now serving.",
                         code="version_conflict", headers={"Retry-After": "1"})


def policy_from_request(target_false_alarm_rate: float | None, threshold: float | None,
                        policy: str | None) -> DecisionPolicy:
    """Exactly one of the three ways to choose; 400 otherwise (the schema already bounds the values)."""
    given = [k for k, v in (("target_false_alarm_rate", target_false_alarm_rate), ("threshold", threshold),
                            ("policy", policy)) if v is not None]
    if len(given) != 1:
        raise BadRequestError("give exactly one of target_false_alarm_rate, threshold or policy='auto'"
                              f" (got {', '.join(given) or 'none'})", code="invalid_policy")
    try:
        if threshold is not None:
            return DecisionPolicy("manual", threshold=threshold)
        if target_false_alarm_rate is not None:
            return DecisionPolicy("target_rate", target_false_alarm_rate=target_false_alarm_rate)
        if policy != "auto":
            raise ValueError(f"policy must be 'auto' (use threshold or target_false_alarm_rate for the others), "
                             f"got {policy!r}")
        return DecisionPolicy()
    except ValueError as exc:
        raise BadRequestError(str(exc), code="invalid_policy") from exc


class CategoryEdits:
    """Threshold policy, operator feedback and shot management (mixed into ``CategoryService``)."""

    settings: Settings
    store: AdapterStore
    cache: Any

    # provided by CategoryService
    def _existing(self, category: str) -> str: raise NotImplementedError  # pragma: no cover
    def _lock(self, category: str) -> asyncio.Lock: raise NotImplementedError  # pragma: no cover

    @contextlib.asynccontextmanager
    async def _holding(self, name: str) -> AsyncIterator[Hold]:
        """A store hold on the shot files this request writes, from before they exist until it ends."""
        manager = self.store.hold(name)
        held = await run_in_threadpool(manager.__enter__)
        try:
            yield held
        finally:
            await run_in_threadpool(manager.__exit__, None, None, None)

    def _tidy(self, name: str) -> None:
        """After a new version: apply version retention and sweep unlisted shot files (never fails the edit)."""
        try:
            pruned, swept = self.store.tidy(name, keep_versions=self.settings.keep_versions)
        except (OSError, StoreError):
            log.warning("could not tidy category %r (retention / orphan sweep)", name, exc_info=True)
            return
        if pruned or swept:
            log.info("category %r: removed versions %s (CLIPSHOT_KEEP_VERSIONS=%d) and %d unlisted shot file(s)",
                     name, pruned, self.settings.keep_versions, len(swept))

    async def _ledger(self, category: str) -> tuple[str, Ledger]:
        """(name, ledger of the active version), 404 for an unknown category; read off the event loop."""
        name = await run_in_threadpool(self._existing, category)
        return name, await run_in_threadpool(current_ledger, self.store, name)

    @staticmethod
    def _served(name: str, ledger: Ledger) -> Any:
        """The active manifest, or 409: every edit starts from the version that serves now."""
        if ledger.manifest is None:
            raise ConflictError(f"category {name!r} has no usable active version; activate one first",
                                code="no_active_version")
        return ledger.manifest

    # -- threshold ----------------------------------------------------------------------------------
    async def set_threshold(self, category: str, policy: DecisionPolicy, *, dry_run: bool = False) -> dict[str, Any]:
        """New version = the active one under ``policy``; its tensors are reused byte for byte.

        ``dry_run`` computes the decision and its warnings and writes nothing: the console previews a change
        and asks before applying one that switches inspection off."""
        name = await run_in_threadpool(self._existing, category)
        async with self._lock(name):
            _, ledger = await self._ledger(name)
            manifest = self._served(name, ledger)
            raw = manifest.adapter.get("calibration")
            if not raw:
                raise ConflictError(f"version {manifest.version} of {name!r} has no calibration to move",
                                    code="no_calibration")
            try:
                cal = apply_policy(Calibration.from_dict(raw), policy)
            except ValueError as exc:  # e.g. a bundle from before the evidence was stored
                raise ConflictError(f"version {manifest.version} of {name!r} cannot take this policy: {exc}; "
                                    "re-register its shots to store calibration evidence",
                                    code="no_calibration") from exc
            decision = cal.decision()
            if dry_run:
                return {"category": name, "version": manifest.version, "decision": decision, "dry_run": True,
                        "warnings": decision_warnings(decision)}
            goods = sum(r.source == "feedback" for r in manifest.shots)
            metrics = {**manifest.metrics, "threshold": cal.threshold, "policy_of_version": manifest.version,
                       "validation": validation_facts(cal.to_dict(), goods, len(manifest.validation))}
            changes = {"adapter": {**manifest.adapter, "calibration": cal.to_dict()}, "metrics": metrics}
            try:
                version = await run_in_threadpool(partial(self.store.derive, name, manifest.version, changes,
                                                          expect_active=ledger.active))
            except StaleVersion as exc:
                raise stale_conflict(name, exc) from exc
            await run_in_threadpool(self._tidy, name)
        self.cache.invalidate(name)
        return {"category": name, "version": version, "decision": decision, "warnings": decision_warnings(decision)}

    # -- feedback -----------------------------------------------------------------------------------
    async def check_feedback(self, category: str, files: list[tuple[str, bytes]], *, label: str,
                             defect_type: str | None = None, note: str | None = None) -> str:
        """Every check ``feedback`` makes before writing, against the product as it is now (nothing written):
        feedback answered 202 must have failed these with a 4xx instead."""
        check_feedback_fields(label, defect_type, note)
        name, hashes, sizes = await run_in_threadpool(self.validate_upload, category, files, minimum=1)
        name, ledger = await self._ledger(name)
        await run_in_threadpool(self._check_feedback, name, ledger, label, hashes, sizes)
        return name

    def _check_feedback(self, name: str, ledger: Ledger, label: str, hashes: list[str],
                        sizes: list[tuple[int, int]]) -> tuple[Any, set[str], set[str]]:
        """(served manifest, hashes already under ``label``, new hashes), or the 4xx that refuses the images."""
        manifest = self._served(name, ledger)
        # the category's geometry must apply to every new image (400 before anything is stored)
        self._plan_geometry(name, ledger, sizes, GeometryRequest())
        if not manifest.adapter.get("memory_layers"):
            raise ConflictError(f"version {manifest.version} of {name!r} has no memory branch, so confirmed "
                                "images cannot be learnt; register good shots first", code="no_memory_branch")
        same, other = ((ledger.good_hashes, ledger.defect_hashes) if label == "good"
                       else (ledger.defect_hashes, ledger.good_hashes))
        clash = other & set(hashes)
        if clash:
            raise ConflictError(f"{len(clash)} image(s) are already listed as "
                                f"{'defects' if label == 'good' else 'good shots'}; remove them first "
                                "(DELETE .../shots/{sha256} for a good shot)", code="label_conflict")
        fresh = set(hashes) - same
        total = len(same | fresh)
        if total > self.settings.max_category_images:
            raise BadRequestError(f"the product would hold {total} {label} images, at most "
                                  f"{self.settings.max_category_images}", code="too_many_images")
        return manifest, same, fresh

    async def feedback(self, category: str, files: list[tuple[str, bytes]], *, label: str,
                       defect_type: str | None = None, note: str | None = None,
                       progress: RefitProgress | None = None) -> dict[str, Any]:
        """Confirmed goods join the memory, confirmed defects the validation set; a new version either way."""
        check_feedback_fields(label, defect_type, note)
        name, hashes, sizes = await run_in_threadpool(self.validate_upload, category, files, minimum=1)
        name = await run_in_threadpool(self._existing, name)
        async with self._lock(name):
            if progress is not None:
                await progress.started()
            _, ledger = await self._ledger(name)
            manifest, same, fresh = await run_in_threadpool(self._check_feedback, name, ledger, label, hashes, sizes)
            duplicates = len(hashes) - len(fresh)
            version = manifest.version
            cal = manifest.adapter.get("calibration")
            if fresh:
                extra = {"defect_type": defect_type, "note": note} if label == "defect" else {"note": note}
                async with self._holding(name) as held:
                    added = await self._store_images(name, files, source="feedback", label=label, skip=same,
                                                     held=held, **{k: v for k, v in extra.items() if v is not None})
                    goods = ledger.goods + (added if label == "good" else [])
                    defects = ledger.defects + (added if label == "defect" else [])
                    version, adapter = await self._fit_and_save(name, goods, defects, base=manifest,
                                                                through_lora=True, new=added, expect=ledger.active,
                                                                held=held, progress=progress)
                cal = adapter.config()["calibration"]
                n_goods = sum(r.get("source") == "feedback" for r in goods)
                n_defects = len(defects)
            else:  # nothing new: no version to make
                n_goods = sum(r.source == "feedback" for r in manifest.shots)
                n_defects = len(manifest.validation)
        if fresh:
            self.cache.invalidate(name)
        decision = Calibration.from_dict(cal).decision() if cal else None
        return {"category": name, "version": version, "added": len(fresh), "duplicates": duplicates,
                "decision": decision, "validation": validation_facts(cal, n_goods, n_defects)}

    # -- shots --------------------------------------------------------------------------------------
    def list_shots(self, category: str) -> dict[str, Any]:
        """The good images the active version was fitted on, oldest first."""
        name = self._existing(category)
        return {"shots": [{"sha256": r["sha256"], "file_name": r.get("file_name"), "added_at": r.get("added_at"),
                           "source": r.get("source", "registration"), "label": r.get("label", "good")}
                          for r in current_ledger(self.store, name).goods]}

    async def check_remove_shot(self, category: str, sha256: str) -> str:
        """Every check ``remove_shot`` makes before writing, against the product as it is now."""
        name = await run_in_threadpool(self._existing, category)
        self._check_removal(name, (await self._ledger(name))[1], sha256)
        return name

    def _check_removal(self, name: str, ledger: Ledger, sha256: str) -> tuple[Any, list[dict[str, Any]]]:
        """(served manifest, the good shots without ``sha256``), or the 4xx that refuses the removal."""
        if not SHA256.fullmatch(sha256):
            raise BadRequestError(f"invalid sha256 {sha256!r}: 64 lowercase hex digits", code="invalid_sha256")
        manifest = self._served(name, ledger)
        if sha256 not in ledger.good_hashes:
            raise NotFoundError(f"{name!r} has no good shot {sha256} in its active version "
                                "(see GET .../shots)", code="shot_not_found")
        goods = [r for r in ledger.goods if r["sha256"] != sha256]
        if not goods:
            raise ConflictError(f"{sha256} is the only shot of {name!r}; add another before removing it, "
                                "or delete the category", code="last_shot")
        return manifest, goods

    async def remove_shot(self, category: str, sha256: str, *,
                          progress: RefitProgress | None = None) -> dict[str, Any]:
        """New version fitted without one good image (409 if it is the last); its file stays for rollback."""
        name = await run_in_threadpool(self._existing, category)
        if not SHA256.fullmatch(sha256):
            raise BadRequestError(f"invalid sha256 {sha256!r}: 64 lowercase hex digits", code="invalid_sha256")
        async with self._lock(name):
            if progress is not None:
                await progress.started()
            _, ledger = await self._ledger(name)
            manifest, goods = self._check_removal(name, ledger, sha256)
            try:
                version, adapter = await self._fit_and_save(name, goods, ledger.defects, base=manifest,
                                                            through_lora=True, expect=ledger.active,
                                                            progress=progress)
            except StoreError as exc:
                raise ConflictError(str(exc), code="shots_missing") from exc
        self.cache.invalidate(name)
        return {"category": name, "version": version, "shots": len(goods), "removed": sha256,
                "decision": adapter.calibration.decision() if adapter.calibration else None}

    # -- retention ----------------------------------------------------------------------------------
    async def pin(self, category: str, version: int, pinned: bool) -> dict[str, Any]:
        """Pin (keep) or unpin a version; 404 for an unknown category or (pinning) version."""
        name = await run_in_threadpool(self._existing, category)
        try:
            pins = await run_in_threadpool(self.store.pin, name, version, pinned)
        except VersionNotFound as exc:
            raise NotFoundError(str(exc), code="version_not_found") from exc
        except StoreError as exc:
            raise ConflictError(f"version {version} of {name!r} cannot be pinned: {exc}",
                                code="version_corrupt") from exc
        return {"category": name, "pinned": sorted(pins)}

    # declared for type checkers; implemented by CategoryService
    def validate_upload(self, category: str, files: list[tuple[str, bytes]], *,
                        minimum: int | None = None) -> tuple[str, list[str], list[tuple[int, int]]]:
        raise NotImplementedError  # pragma: no cover
    def _plan_geometry(self, name: str, ledger: Ledger, sizes: list[tuple[int, int]],
                       request: GeometryRequest) -> Any: raise NotImplementedError  # pragma: no cover
    async def _store_images(self, name: str, files: list[tuple[str, bytes]], *, source: str,
                            skip: set[str], held: Hold, **fields: Any) -> list[dict[str, Any]]:
        raise NotImplementedError  # pragma: no cover
    async def _fit_and_save(self, name: str, goods: list[dict[str, Any]], defects: list[dict[str, Any]], *,
                            base: Any, through_lora: bool, object_name: str | None = None,
                            new: Sequence[dict[str, Any]] = (), expect: int | None, held: Hold | None = None,
                            progress: RefitProgress | None = None) -> tuple[int, Any]:
        raise NotImplementedError  # pragma: no cover
