"""Image- and pixel-level AUROC (MVTec protocol), delegated to scikit-learn."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import roc_auc_score

from ._common import ArrayLike2D, has_both_classes, image_inputs, pixel_inputs, weighted_pixels


def image_auroc(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float:
    """Area under the ROC of per-image scores; NaN (with a warning) if only one class is present."""
    y, s = image_inputs(labels, scores)
    if not has_both_classes(y, "image AUROC"):
        return float("nan")
    return float(roc_auc_score(y, s))


def pixel_auroc(masks: ArrayLike2D, maps: ArrayLike2D) -> float:
    """ROC area over all pixels of all images pooled together (nothing subsampled).

    Masks may be bool or 0/1 (anything non-zero is anomalous); maps float16/32/64, each the same
    shape as its mask. Large inputs are binned first (``weighted_pixels``) so full-resolution maps
    evaluate in seconds.
    """
    y, s = pixel_inputs(masks, maps)
    if not has_both_classes(y, "pixel AUROC"):
        return float("nan")
    labels, scores, weights = weighted_pixels(y, s)
    return float(roc_auc_score(labels, scores, sample_weight=weights))
