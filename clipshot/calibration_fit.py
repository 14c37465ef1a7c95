"""The fit's last step: a product's shots (and confirmed defects) -> its ``Calibration``, in bounded chunks.

Kept apart from ``Detector`` because it only orchestrates other modules through the detector's public scoring
methods: gather the leave-one-out evidence (``clipshot.calibration_evidence``), let the product choose its scoring
when asked (``clipshot.scoring_selection``), score the confirmed defects, and hand the scores to
``clipshot.calibration.calibrate``. It is a generator like every fit step (``clipshot.chunked``), so a fit never
holds the device for long.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from PIL import Image

from clipshot import calibration_evidence as evidence
from clipshot import position_baseline
from clipshot import scoring_selection as selection
from clipshot.adapter import Adapter
from clipshot.calibration import Calibration, DecisionPolicy, calibrate
from clipshot.chunked import Stage, Steps, staged
from clipshot.features import FEATURE_BATCH, Features

if TYPE_CHECKING:
    from clipshot.detector import Detector


def calibrate_steps(detector: Detector, adapter: Adapter, shots: list[Image.Image], feats: Features, views: int,
                    defects: list[Image.Image], policy: DecisionPolicy,
                    coreset_ratio: float | None = None, confirmed: Sequence[int] = ()) -> Steps[Calibration]:
    """The threshold from leave-one-out evidence (``clipshot.calibration_evidence``): each shot, light variants
    of it and synthetic defects made from it scored against a memory of the *other* shots.

    With ``adapter.selection`` set (a product that chooses its own scoring), every candidate scoring is applied
    to the same evidence and the adapter keeps the one that separates its synthetic defects from its unseen
    normals best (``clipshot.scoring_selection``); the served bank is then rebuilt the chosen way. Then the
    product decides, on the same evidence, whether its maps are divided by its own normal level per position
    (``clipshot.position_baseline``), and the threshold comes from the maps it will serve."""
    adapter.baseline = None  # the evidence is scored on plain maps; the product's level is decided from them
    found = yield from evidence.gather(detector, adapter, shots, feats, views)
    folds = found.feats.batch_size
    if adapter.selection is not None and adapter.memory is not None:
        runs = len(selection.candidates(adapter.scoring, staged=detector.backbone.stage_dims is not None))
        loo = yield from staged("leave-one-out calibration", folds * runs, selection.select(detector, adapter, found))
        adapter.memory = yield from staged("building memory bank", 1,
                                           detector.memory_bank_steps(feats, adapter, coreset_ratio), per_chunk=0)
    else:
        loo = yield from staged("leave-one-out calibration", folds,
                                evidence.leave_one_out(detector, adapter, found, served=adapter.memory))
    loo = position_baseline.decide(adapter, found, loo)
    validation: list[float] = []
    step = max(1, FEATURE_BATCH // adapter.geometry.views_per_image)
    for start in range(0, len(defects), step):
        validation.extend(detector.score_images(defects[start : start + step], adapter))
        yield Stage("scoring confirmed defects", min(start + step, len(defects)), len(defects))
    method = "leave-one-out" if len(shots) > 1 else "single-shot-augmented"
    return calibrate(loo.normal, loo.synthetic, shots=len(shots), validation_defect_scores=validation,
                     policy=policy, method=method, confirmed=confirmed)
