"""MVTec AD metrics: one metric per module, all taking plain numpy inputs."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ._common import ArrayLike2D
from .aupro import DEFAULT_BINS, aupro, pro_curve
from .auroc import image_auroc, pixel_auroc
from .decision import DECISION_METRICS, decision_metrics, recall_by_defect
from .f1max import f1_max, image_f1max, pixel_f1max

QUALITY_METRICS = ("image_auroc", "pixel_auroc", "aupro", "image_f1max", "pixel_f1max")


def compute_metrics(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray,
                    masks: ArrayLike2D, maps: ArrayLike2D, *, max_fpr: float = 0.3,
                    aupro_bins: int | None = DEFAULT_BINS, threshold: float | None = None,
                    defects: Sequence[str] | None = None, pixel: bool = True) -> dict[str, float]:
    """The five quality metrics of the protocol (``QUALITY_METRICS``) and, when the adapter has a threshold,
    the decision metrics at it (``DECISION_METRICS``, the gap to F1-max, recall per defect type as ``recall:<defect>``).
    ``pixel=False`` skips the three pixel metrics (the expensive part) where only decisions matter."""
    found = {"image_auroc": image_auroc(labels, scores), "image_f1max": image_f1max(labels, scores)}
    if pixel:
        found.update(pixel_auroc=pixel_auroc(masks, maps), pixel_f1max=pixel_f1max(masks, maps),
                     aupro=aupro(masks, maps, max_fpr=max_fpr, num_bins=aupro_bins))
    out = {name: found[name] for name in QUALITY_METRICS if name in found}  # table order
    if threshold is not None:
        out.update(decision_metrics(labels, scores, threshold))
        out["f1_gap"] = out["image_f1max"] - out["f1_at_threshold"]
        out["threshold"] = float(threshold)
        if defects is not None:
            out.update({f"recall:{defect}": value
                        for defect, value in recall_by_defect(labels, scores, defects, threshold).items()})
    return out


__all__ = ["DECISION_METRICS", "QUALITY_METRICS", "aupro", "compute_metrics", "decision_metrics", "f1_max",
           "image_auroc", "image_f1max", "pixel_auroc", "pixel_f1max", "pro_curve", "recall_by_defect"]
