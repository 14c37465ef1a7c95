"""The score distributions a product's decision rests on, read from the active version's stored calibration.

Why this exists: a threshold is a line through distributions (good parts scored against a memory that never saw
them, synthetic and confirmed defects, the line's own traffic); an operator moves it well only while seeing them.
Everything here is read from the manifest (no tensors, no images), so it is as cheap as the category detail.

Recorded inspections are comparable with the active version only when the same model scored them: a threshold
change makes a new version with the same tensors byte for byte, so its scores are those of the versions it was
derived from. ``model_versions`` finds those versions (same tensors, same adapter settings apart from the
calibration), and the record is read for them, not for the active version alone, which after a threshold change
has scored nothing yet.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from app.categories.shot_ledger import current_ledger
from app.errors import ConflictError
from clipshot.calibration import Calibration, image_scores
from model_store import AdapterStore, Manifest, StoreError


def _same_model(a: Manifest, b: Manifest) -> bool:
    """True when ``a`` and ``b`` score every image alike: same tensors, backbone and adapter settings (the
    calibration, which only moves the threshold, aside)."""
    def rest(m: Manifest) -> dict[str, Any]:
        return {k: v for k, v in m.adapter.items() if k != "calibration"}

    return a.tensors_sha256 == b.tensors_sha256 and a.backbone == b.backbone and rest(a) == rest(b)


def model_versions(store: AdapterStore, name: str, active: Manifest) -> list[int]:
    """The stored versions that score like ``active`` (itself included), ascending; unreadable ones are left out."""
    found = []
    for version in store.versions(name):
        try:
            manifest = active if version == active.version else store.manifest(name, version)
        except StoreError:
            continue
        if _same_model(manifest, active):
            found.append(version)
    return found


def score_evidence(store: AdapterStore, name: str) -> dict[str, Any]:
    """The active version's evidence split by kind, its decision, and the versions whose records compare with it.

    409 ``no_active_version`` when no version serves, ``no_calibration`` when the active one stores no evidence
    (a bundle from before the evidence was kept)."""
    manifest = current_ledger(store, name).manifest
    if manifest is None:
        raise ConflictError(f"category {name!r} has no usable active version; activate one first",
                            code="no_active_version")
    raw = manifest.adapter.get("calibration")
    cal = Calibration.from_dict(raw) if raw else None
    if cal is None or not cal.normal_scores:
        raise ConflictError(f"version {manifest.version} of {name!r} stores no calibration evidence; re-register "
                            "its shots to store it", code="no_calibration")
    confirmed = set(cal.confirmed)
    groups = image_scores(cal)
    return {
        "category": name, "version": manifest.version, "decision": cal.decision(),
        "normal": [s for i, g in enumerate(groups) if i not in confirmed for s in g],
        "confirmed_goods": [s for i, g in enumerate(groups) if i in confirmed for s in g],
        "synthetic_defects": list(cal.defect_scores),
        "confirmed_defects": list(cal.validation_defect_scores),
        "good_images": len(groups),
        "defect_evidence": ("confirmed" if cal.validation_defect_scores
                            else "synthetic" if cal.defect_scores else None),
        "model_versions": model_versions(store, name, manifest),
    }


def recorded_effect(scores: Sequence[float], now: float | None, candidate: float,
                    versions: Sequence[int]) -> dict[str, Any]:
    """What ``score > threshold`` flags among recorded ``scores`` at the threshold in force (``now``; None when
    there is none) and at a ``candidate`` one: counts and shares (None when nothing was recorded)."""
    count = len(scores)
    flagged = sum(s > candidate for s in scores)
    flagged_now = None if now is None else sum(s > now for s in scores)
    return {"inspections": count, "versions": list(versions), "threshold_now": now,
            "flagged_now": flagged_now, "flagged": flagged,
            "share_now": None if flagged_now is None or not count else flagged_now / count,
            "share": flagged / count if count else None}
