"""Input normalisation shared by the metric functions.

Metrics are computed on flat arrays; this module is the single place that validates shapes and
dtypes, so that every metric rejects the same malformed inputs with the same messages.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

ArrayLike2D = np.ndarray | Sequence[np.ndarray]


def image_inputs(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Validate per-image labels (0 normal, 1 anomalous) and scores; return flat bool / float64."""
    y = np.asarray(labels).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in length: {y.size} vs {s.size}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 (normal) or 1 (anomalous)")
    _check_finite(s)
    return y.astype(bool), s


def pixel_pairs(masks: ArrayLike2D, maps: ArrayLike2D) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Validate per-image (mask, map) pairs: equal 2-D shapes, finite floating maps, bool masks.

    float16 maps are widened to float32 (lossless); float32/float64 are kept as they are.
    """
    if len(masks) != len(maps):
        raise ValueError(f"got {len(masks)} masks but {len(maps)} maps")
    if len(maps) == 0:
        raise ValueError("no images given")
    out_masks, out_maps = [], []
    for i, (mask, amap) in enumerate(zip(masks, maps, strict=True)):
        mask, amap = np.asarray(mask), np.asarray(amap)
        if mask.shape != amap.shape or amap.ndim != 2:
            raise ValueError(f"image {i}: mask shape {mask.shape} != map shape {amap.shape} "
                             "(both must be 2-D and equal)")
        if amap.dtype not in (np.float32, np.float64):
            amap = amap.astype(np.float32 if amap.dtype == np.float16 else np.float64)
        _check_finite(amap)
        out_masks.append(mask if mask.dtype == bool else mask != 0)
        out_maps.append(amap)
    return out_masks, out_maps


def pixel_inputs(masks: ArrayLike2D, maps: ArrayLike2D) -> tuple[np.ndarray, np.ndarray]:
    """Flatten per-image masks and maps into one bool and one float vector.

    Every pixel of every image is kept (no subsampling), so the result is the exact pooled metric
    of the MVTec protocol.
    """
    mask_list, map_list = pixel_pairs(masks, maps)
    return np.concatenate([m.reshape(-1) for m in mask_list]), np.concatenate(
        [m.reshape(-1) for m in map_list])


def has_both_classes(y: np.ndarray, what: str) -> bool:
    """Ranking metrics are undefined with a single class; warn and let the caller return NaN."""
    n_pos = int(np.count_nonzero(y))
    if n_pos == 0 or n_pos == y.size:
        warnings.warn(f"{what} is undefined when all samples belong to one class; returning NaN",
                      RuntimeWarning, stacklevel=3)
        return False
    return True


def _check_finite(s: np.ndarray) -> None:
    if not np.isfinite(s).all():
        raise ValueError("scores/maps contain NaN or infinite values")


PIXEL_BINS = 2**20  # same resolution as AUPRO's sweep; ties only inside 1/1M of the score range


def weighted_pixels(y: np.ndarray, s: np.ndarray, num_bins: int = PIXEL_BINS
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Compress millions of pixels into per-bin (label, score, count) rows for scikit-learn.

    Full-resolution MVTec maps are ~67M pixels per category; sorting them inside scikit-learn takes
    ~45 s. Equal-width bins keep the ranking exact except between pixels that share one bin, and
    ``sample_weight`` carries the counts, so the ROC/PR curves are the library's own. Small inputs
    are passed through unchanged (exact).
    """
    if s.size <= 2 * num_bins:
        return y, s, None
    lo, hi = float(s.min()), float(s.max())
    if hi <= lo:
        return y[:1].repeat(2), np.zeros(2), None
    idx = np.minimum(((s - lo) * ((num_bins - 1) / (hi - lo))).astype(np.int64), num_bins - 1)
    neg = np.bincount(idx[~y], minlength=num_bins)
    pos = np.bincount(idx[y], minlength=num_bins)
    neg_bins, pos_bins = np.flatnonzero(neg), np.flatnonzero(pos)
    labels = np.concatenate([np.zeros(neg_bins.size, bool), np.ones(pos_bins.size, bool)])
    scores = np.concatenate([neg_bins, pos_bins]).astype(np.float64)
    weights = np.concatenate([neg[neg_bins], pos[pos_bins]]).astype(np.float64)
    return labels, scores, weights
