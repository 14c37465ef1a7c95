"""What the listing routes show about a category's versions, read from manifests without loading tensors.

Why its own module: listings are read-only and run for every console refresh; keeping them apart from the
category service's mutations keeps each file to what it holds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from app.categories.shot_ledger import current_ledger, validation_facts
from clipshot.calibration import Calibration
from model_store import AdapterStore, StoreError


def summary(store: AdapterStore, name: str) -> dict[str, Any]:
    """Active version, versions and shot count of an existing category."""
    try:
        active = store.active_version(name)
    except StoreError:
        active = None
    return {"category": name, "active_version": active, "versions": store.versions(name),
            "shots": len(current_ledger(store, name).goods)}


def detail(store: AdapterStore, info: dict[str, Any], integrity: Callable[[str, int], str]) -> dict[str, Any]:
    """``summary`` ``info`` with each version's key facts and the active decision."""
    name = info["category"]
    manifest = current_ledger(store, name).manifest
    calibration = None if manifest is None else manifest.adapter.get("calibration")
    try:
        pins: set[int] | None = store.pinned(name)
    except StoreError:  # an unreadable pins file: say "unknown" rather than "not pinned"
        pins = None
    versions = [version_facts(store, name, v, info["active_version"], integrity) for v in info["versions"]]
    for facts in versions:
        facts["pinned"] = None if pins is None else facts["version"] in pins
    return {**info, "versions": versions,
            "decision": Calibration.from_dict(calibration).decision() if calibration else None}


def version_facts(store: AdapterStore, name: str, version: int, active: int | None,
                  integrity: Callable[[str, int], str]) -> dict[str, Any]:
    """One version's manifest facts; a version whose manifest cannot be read says why under ``error``."""
    facts: dict[str, Any] = {"version": version, "active": version == active}
    try:
        m = store.manifest(name, version)
    except StoreError as exc:
        return {**facts, "error": str(exc)}
    goods = sum(r.source == "feedback" for r in m.shots)
    return {**facts, "integrity": integrity(name, version), "created": m.created, "promotable": m.promotable,
            "kind": m.metrics.get("kind", "finetuned" if m.adapter.get("lora") else "memory"),
            "branches": m.metrics.get("branches", []), "object_name": m.adapter.get("object_name"),
            "shots": len(m.shots), "metrics": m.metrics,
            "training_seconds": None if m.training is None else m.training.seconds,
            "backbone": m.backbone.spec, "runtime": m.backbone.runtime or "torch",
            "geometry": m.adapter.get("geometry"),
            "scoring": m.adapter.get("scoring"), "scoring_selection": m.adapter.get("scoring_selection"),
            "position_baseline": m.adapter.get("position_baseline"),
            "validation": validation_facts(m.adapter.get("calibration"), goods, len(m.validation))}


class IntegrityCache:
    """``ok`` or why a version's tensors fail their checksum, cached per file state (bundles can be large)."""

    def __init__(self, store: AdapterStore) -> None:
        self.store = store
        self._cache: dict[tuple[str, int, int, int, int], str] = {}

    def __call__(self, name: str, version: int) -> str:
        try:
            st = self.store.tensors_path(name, version).stat()
            key = (name, version, st.st_ino, st.st_size, st.st_mtime_ns)
        except OSError as exc:
            return f"corrupt: {exc.strerror}"
        if key not in self._cache:
            try:
                self.store.verify(name, version)
                self._cache[key] = "ok"
            except StoreError as exc:
                self._cache[key] = f"corrupt: {exc}"
        return self._cache[key]
