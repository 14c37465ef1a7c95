"""Image- and pixel-level F1-max: the best F1 over all thresholds (an oracle-threshold score).

It complements AUROC on the heavily imbalanced pixel task, where AUROC saturates.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import precision_recall_curve

from ._common import ArrayLike2D, has_both_classes, image_inputs, pixel_inputs, weighted_pixels


def f1_max(y_true: np.ndarray, y_score: np.ndarray, sample_weight: np.ndarray | None = None) -> float:
    """max over thresholds of 2PR/(P+R) from scikit-learn's precision-recall curve (P+R=0 -> F1=0)."""
    precision, recall, _ = precision_recall_curve(y_true, y_score, sample_weight=sample_weight)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    return float(f1.max())


def image_f1max(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float:
    """F1-max of per-image scores; NaN (with a warning) if only one class is present."""
    y, s = image_inputs(labels, scores)
    if not has_both_classes(y, "image F1-max"):
        return float("nan")
    return f1_max(y, s)


def pixel_f1max(masks: ArrayLike2D, maps: ArrayLike2D) -> float:
    """F1-max over all pixels of all images pooled together (nothing subsampled; binned when large)."""
    y, s = pixel_inputs(masks, maps)
    if not has_both_classes(y, "pixel F1-max"):
        return float("nan")
    return f1_max(*weighted_pixels(y, s))
