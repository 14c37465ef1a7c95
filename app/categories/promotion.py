"""What becomes of a finished fine-tune's result: saved always, activated only while it is still current.

Why a compare-and-set and not a freshness check: between "is the category still as I trained it?" and the
save, an operator (or another replica) may roll back, change the threshold or add shots; an unconditional
activation would silently undo that edit. So the job decides, then commits with the store's
``expect_active``; if the active version moved in between, it decides again.

Current means the active version is the trained-from one, or differs from it in its decision policy alone
(same tensors, shots, confirmed defects and adapter settings: a threshold change). The promoted version then
takes the *current* active version's policy, so a threshold chosen during training survives. Anything else
(a rollback, new shots, feedback, an activated other version) supersedes the job: its version is kept,
inactive, for an operator to activate.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from app.categories.shot_ledger import Ledger, adapter_facts, current_ledger
from clipshot.calibration import Calibration, apply_policy
from clipshot.detector import Detector
from model_store import AdapterStore, StaleVersion, StoreError
from model_store.adapters import save_adapter
from model_store.bundles import UNCHECKED
from model_store.manifest import Manifest

if TYPE_CHECKING:  # the job runner calls this module; categories never import jobs at run time
    from app.jobs.job_model import Job

log = logging.getLogger(__name__)
CAS_ATTEMPTS = 5  # decisions retried when the active version moves between the check and the commit


def same_evidence(now: Manifest | None, trained: Manifest) -> bool:
    """True when ``now`` differs from the trained-from version in its decision policy (and metrics) alone."""
    if now is None:
        return False

    def key(m: Manifest) -> tuple:
        adapter = {k: v for k, v in m.adapter.items() if k != "calibration"}
        return m.tensors_sha256, [r.name for r in m.shots], [r.name for r in m.validation], adapter

    return key(now) == key(trained)


def save_result(store: AdapterStore, detector: Detector, job: Job, result: Any, ledger: Ledger, *,
                keep_versions: int) -> dict[str, Any]:
    """Save ``result`` (trained from ``ledger``'s version) and promote it if still current; returns job fields.

    ``metrics.promotion`` is ``promoted``, ``superseded`` or ``not_promotable``. Afterwards the category is
    tidied (retention, orphan sweep)."""
    trained = ledger.manifest
    if trained is None:  # the job runner trains only from a readable version
        raise ValueError(f"{job.category!r}: the fine-tune has no trained-from version to save against")
    fields: dict[str, Any] = {"shots": ledger.goods, "validation": ledger.defects,
                              "promotable": bool(result.promotable),
                              "training": {"config": result.config, "seconds": result.seconds, "job_id": job.id}}
    version, outcome, metrics = None, "superseded", dict(result.metrics)
    if result.adapter.shot_images is None:  # same shots as the version trained from: same image facts
        result.adapter.shot_images = trained.adapter.get("shot_images")
    for _ in range(CAS_ATTEMPTS):
        now = current_ledger(store, job.category)
        current = same_evidence(now.manifest, trained)
        outcome = "not_promotable" if not result.promotable else ("promoted" if current else "superseded")
        raw = now.manifest.adapter.get("calibration") if outcome == "promoted" and now.manifest else None
        if raw and result.adapter.calibration is not None:  # the policy serving now, not the one at the start
            result.adapter.calibration = apply_policy(result.adapter.calibration,
                                                      Calibration.from_dict(raw).policy_spec())
        metrics = {**result.metrics, **adapter_facts(result.adapter, "finetuned"), "trained_from": trained.version,
                   "promotion": outcome}
        promote = outcome == "promoted"
        try:
            version = save_adapter(store, detector, result.adapter, activate=promote, metrics=metrics,
                                   expect_active=now.active if promote else UNCHECKED, **fields)
            break
        except StaleVersion:  # the active version moved between the check and the commit: decide again
            continue
    if version is None:  # the category kept changing: keep the result, inactive
        outcome = metrics["promotion"] = "superseded"
        version = save_adapter(store, detector, result.adapter, activate=False, metrics=metrics, **fields)
    try:
        store.tidy(job.category, keep_versions=keep_versions)
    except (OSError, StoreError):
        log.warning("could not tidy category %r after a fine-tune", job.category, exc_info=True)
    return {"progress": 1.0, "step": result.metrics.get("steps"), "result_version": version,
            "message": _message(version, outcome, trained, result), "metrics": metrics}


def _message(version: int, outcome: str, trained: Manifest, result: Any) -> str:
    if outcome == "promoted":
        return f"version {version} promoted and active"
    if outcome == "superseded":
        return (f"version {version} saved inactive (superseded): the active version changed from v{trained.version} "
                "during training (a rollback, new shots, feedback or another activated version); activate "
                f"v{version} to serve it anyway, or start a new fine-tune")
    rule = result.metrics.get("promotable_rule", "validation did not beat the memory adapter")
    ft, mem = result.metrics.get("auroc_finetuned"), result.metrics.get("auroc_memory")
    return (f"version {version} saved inactive: not promotable ({rule}; finetuned AUROC {ft}, "
            f"memory AUROC {mem}); the memory adapter stays active")
