"""MVTec AD metrics: one metric per module, all taking plain numpy inputs."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ._common import ArrayLike2D
from .aupro import DEFAULT_BINS, aupro, pro_curve
from .auroc import image_auroc, pixel_auroc
from .f1max import f1_max, image_f1max, pixel_f1max

QUALITY_METRICS = ("image_auroc", "pixel_auroc", "aupro", "image_f1max", "pixel_f1max")


def compute_metrics(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray,
                    masks: ArrayLike2D, maps: ArrayLike2D, *, max_fpr: float = 0.3,
                    aupro_bins: int | None = DEFAULT_BINS) -> dict[str, float]:
    """All five quality metrics of the protocol in one call, keyed as in ``QUALITY_METRICS``."""
    return {
        "image_auroc": image_auroc(labels, scores),
        "pixel_auroc": pixel_auroc(masks, maps),
        "aupro": aupro(masks, maps, max_fpr=max_fpr, num_bins=aupro_bins),
        "image_f1max": image_f1max(labels, scores),
        "pixel_f1max": pixel_f1max(masks, maps),
    }


__all__ = ["QUALITY_METRICS", "aupro", "compute_metrics", "f1_max", "image_auroc", "image_f1max",
           "pixel_auroc", "pixel_f1max", "pro_curve"]
