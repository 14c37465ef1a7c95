"""What a fine-tune job trains from, read off the version active when it starts (its ``Ledger``).

Kept apart from ``JobRunner`` (which owns the thread, the claims, the heartbeat and the device calls) because
these are plain functions of the request, the settings and that version: the budget and decision policy the
trainer gets, the geometry it must train in, and whether the serving version can stand in for the memory
baseline the fine-tune must beat.
"""

from __future__ import annotations

from typing import Any

from app.categories.shot_ledger import Ledger, memory_coreset
from app.core.config import Settings
from clipshot.adapter import Adapter
from clipshot.calibration import Calibration
from clipshot.detector import Detector
from clipshot.geometry import Geometry
from model_store import AdapterStore, StoreError
from model_store.adapters import load_adapter
from training.fewshot import FewShotConfig


def trained_geometry(ledger: Ledger) -> Geometry | None:
    """The trained-from version's geometry: training must see the pixels prediction will see."""
    if ledger.manifest is None:
        return None
    try:
        return Geometry.from_dict(ledger.manifest.adapter.get("geometry"))
    except (AttributeError, ValueError, TypeError):
        return None


def finetune_config(settings: Settings, params: dict[str, Any], ledger: Ledger) -> FewShotConfig:
    """Request budget, else the settings' defaults; the seconds budget always caps a job. The result keeps
    the serving version's decision policy (an operator's threshold choice survives a fine-tune)."""
    raw = None if ledger.manifest is None else ledger.manifest.adapter.get("calibration")
    n = len(ledger.goods)
    return FewShotConfig(steps=params.get("steps") or settings.finetune_steps,
                         seconds=params.get("seconds") or settings.finetune_seconds,
                         seed=params.get("seed") or 0, max_shots=settings.max_category_images,
                         policy=Calibration.from_dict(raw).policy_spec() if raw else None,
                         coreset_ratio=memory_coreset(n, settings.max_shots),
                         confirmed=tuple(i for i, r in enumerate(ledger.goods) if r.get("source") == "feedback"))


def memory_baseline(store: AdapterStore, detector: Detector, category: str, ledger: Ledger,
                    config: FewShotConfig) -> Adapter | None:
    """The serving version when it is a memory fit of exactly the job's shots, confirmed defects, policy and
    coreset (it is their twin), so the result need not fit that baseline on the device again; else None."""
    manifest = ledger.manifest
    if manifest is None or manifest.adapter.get("lora") or manifest.metrics.get("kind") != "memory":
        return None
    if manifest.metrics.get("coreset_ratio") != config.coreset_ratio:
        return None
    try:
        return load_adapter(store, detector, category, manifest.version)[0]
    except StoreError:  # deleted or corrupt meanwhile: the trainer fits its own baseline
        return None
