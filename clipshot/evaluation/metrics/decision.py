"""Decision metrics: what a production line gets from ``is_anomalous`` at the adapter's own threshold.

AUROC and F1-max grade the ranking with an oracle threshold; a line acts on the verdict, so these grade the
threshold the adapter actually ships with (``score > threshold`` = anomalous, as the service decides).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ._common import image_inputs

DECISION_METRICS = ("accuracy", "recall", "false_alarm_rate", "precision", "f1_at_threshold")


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den else float("nan")


def decision_metrics(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray,
                     threshold: float) -> dict[str, float]:
    """Accuracy, defect recall, false-alarm rate on good parts, precision and F1 at ``threshold``.

    Undefined ratios (no defects, no goods, nothing flagged) are NaN so they stay visible in reports;
    F1 is 0 when nothing is flagged correctly (the line missed every defect)."""
    y, s = image_inputs(labels, scores)
    flagged = s > float(threshold)
    tp = float(np.sum(flagged & y))
    fp = float(np.sum(flagged & ~y))
    fn = float(np.sum(~flagged & y))
    tn = float(np.sum(~flagged & ~y))
    return {
        "accuracy": _ratio(tp + tn, y.size),
        "recall": _ratio(tp, tp + fn),
        "false_alarm_rate": _ratio(fp, fp + tn),
        "precision": _ratio(tp, tp + fp),
        "f1_at_threshold": _ratio(2 * tp, 2 * tp + fp + fn) if y.any() else float("nan"),
    }


def recall_by_defect(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray,
                     defects: Sequence[str], threshold: float) -> dict[str, float]:
    """Recall per defect type (the anomalous images of each type flagged at ``threshold``)."""
    y, s = image_inputs(labels, scores)
    if len(defects) != y.size:
        raise ValueError(f"got {len(defects)} defect names for {y.size} images")
    names = np.asarray(defects)
    out = {}
    for name in sorted({d for d, is_bad in zip(defects, y, strict=True) if is_bad}):
        pick = (names == name) & y
        out[name] = float(np.mean(s[pick] > float(threshold)))
    return out
