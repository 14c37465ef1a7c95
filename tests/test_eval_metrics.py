"""Metric tests: hand-worked toy cases, scikit-learn cross-checks and sanity limits."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score, roc_curve

from clipshot.evaluation.metrics import (
    QUALITY_METRICS,
    aupro,
    compute_metrics,
    image_auroc,
    image_f1max,
    pixel_auroc,
    pixel_f1max,
    pro_curve,
)

LABELS = [0, 0, 1, 1]
SCORES = [0.1, 0.4, 0.35, 0.8]


def test_image_auroc_hand_computed() -> None:
    # 4 (positive, negative) pairs: 0.35>0.1 yes, 0.35>0.4 no, 0.8>0.1 yes, 0.8>0.4 yes -> 3/4.
    assert image_auroc(LABELS, SCORES) == pytest.approx(0.75)


def test_image_f1max_hand_computed() -> None:
    # threshold 0.8: P=1,R=1/2 -> 2/3; 0.4: P=1/2,R=1/2 -> 1/2; 0.35: P=2/3,R=1 -> 0.8;
    # 0.1: P=1/2,R=1 -> 2/3.  Max = 0.8.
    assert image_f1max(LABELS, SCORES) == pytest.approx(0.8)


def _toy_pixels(rng: np.random.Generator, n: int = 4, side: int = 16) -> tuple[list, list]:
    masks = [np.zeros((side, side), dtype=bool) for _ in range(n)]
    masks[1][2:6, 3:9] = True
    masks[2][10:12, 10:11] = True
    masks[3][0:3, 0:3] = True
    maps = [rng.random((side, side)).astype(np.float32) + 0.5 * m for m in masks]
    return masks, maps


def test_pixel_metrics_match_sklearn_on_flattened_pixels() -> None:
    masks, maps = _toy_pixels(np.random.default_rng(0))
    y = np.concatenate([m.ravel() for m in masks])
    s = np.concatenate([m.ravel() for m in maps])
    assert pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(y, s))
    assert pixel_f1max(masks, maps) == pytest.approx(image_f1max(y.astype(int), s))


def test_pixel_metrics_accept_float16_and_uint8_masks() -> None:
    masks, maps = _toy_pixels(np.random.default_rng(1))
    half = [m.astype(np.float16) for m in maps]
    as_uint8 = [m.astype(np.uint8) * 255 for m in masks]
    y = np.concatenate([m.ravel() for m in masks])
    s = np.concatenate([m.ravel() for m in half]).astype(np.float32)
    assert pixel_auroc(as_uint8, half) == pytest.approx(roc_auc_score(y, s))
    assert aupro(as_uint8, half) == pytest.approx(aupro(masks, [m.astype(np.float32) for m in half]))


@pytest.mark.parametrize("metric", [pixel_auroc, pixel_f1max, aupro])
def test_pixel_metrics_reject_bad_inputs(metric) -> None:
    mask = np.zeros((4, 4), dtype=bool)
    with pytest.raises(ValueError, match="shape"):
        metric([mask], [np.zeros((4, 5), dtype=np.float32)])
    with pytest.raises(ValueError, match="NaN"):
        metric([mask], [np.full((4, 4), np.nan, dtype=np.float32)])
    with pytest.raises(ValueError, match="masks"):
        metric([mask, mask], [np.zeros((4, 4), dtype=np.float32)])


def test_single_class_gives_nan_with_warning() -> None:
    with pytest.warns(RuntimeWarning, match="undefined"):
        assert np.isnan(image_auroc([0, 0], [0.1, 0.2]))
    normal = [np.zeros((3, 3), dtype=bool)]
    with pytest.warns(RuntimeWarning, match="undefined"):
        assert np.isnan(aupro(normal, [np.random.default_rng(0).random((3, 3))]))


def _random_masks(rng: np.random.Generator, n: int = 6, side: int = 48) -> list[np.ndarray]:
    masks = []
    for i in range(n):
        m = np.zeros((side, side), dtype=bool)
        if i % 2:  # half the images are defective, with regions of different sizes
            m[5:5 + 2 * i, 7:12] = True
            m[30:32, 30:33] = True
        masks.append(m)
    return masks


def test_perfect_inverted_random_limits() -> None:
    rng = np.random.default_rng(3)
    masks = _random_masks(rng)
    perfect = [m.astype(np.float32) + 0.1 * rng.random(m.shape, dtype=np.float32) for m in masks]
    inverted = [-p for p in perfect]
    noise = [rng.random(m.shape, dtype=np.float32) for m in masks]
    assert pixel_auroc(masks, perfect) == pytest.approx(1.0)
    assert aupro(masks, perfect) == pytest.approx(1.0)
    assert pixel_f1max(masks, perfect) == pytest.approx(1.0)
    assert pixel_auroc(masks, inverted) == pytest.approx(0.0)
    assert aupro(masks, inverted) == pytest.approx(0.0)
    assert pixel_auroc(masks, noise) == pytest.approx(0.5, abs=0.05)
    # Random maps: PRO(t) ~ FPR(t), so AUPRO ~ (integral of x dx over [0, 0.3]) / 0.3 = 0.15, not 0.5.
    assert aupro(masks, noise) == pytest.approx(0.15, abs=0.04)
    # F1-max of random/inverted maps falls to the "flag everything" F1 = 2p / (1 + p), p = prevalence.
    p = np.mean(np.concatenate([m.ravel() for m in masks]))
    assert pixel_f1max(masks, inverted) == pytest.approx(2 * p / (1 + p))
    labels = [1, 0] * 20
    assert image_auroc(labels, [float(x) for x in labels]) == 1.0
    assert image_auroc(labels, [-float(x) for x in labels]) == 0.0


# AUPRO toy, one 1x10 image. Regions: A = {0} (size 1), B = {7, 8, 9} (size 3); normals 1..6.
TOY_MASK = np.array([[1, 0, 0, 0, 0, 0, 0, 1, 1, 1]], dtype=bool)
TOY_MAP = np.array([[0.9, 0.7, 0.6, 0.3, 0.2, 0.05, 0.0, 0.8, 0.1, 0.6]])
# Sweep, thresholds descending (FPR over the 6 normals, PRO = mean of the two region overlaps):
#   t=0.9: A covered           -> FPR 0,   PRO (1 + 0)/2   = 1/2
#   t=0.8: pixel 7 of B        -> FPR 0,   PRO (1 + 1/3)/2 = 2/3
#   t=0.7: normal 1            -> FPR 1/6, PRO 2/3
#   t=0.6: normal 2 and pixel 9 (tie, joined by a straight segment) -> FPR 1/3, PRO (1 + 2/3)/2 = 5/6
# Area on [0, 0.3]: [0, 1/6] at PRO 2/3 -> 1/9; on [1/6, 0.3] PRO rises with slope 1 from 2/3 to
# 2/3 + 2/15 = 4/5 -> (2/15)(2/3 + 4/5)/2 = 22/225.  Total 47/225, divided by 0.3 -> 94/135.
# (A pixel-TPR curve instead of PRO would give a different number: regions must be averaged.)
TOY_AUPRO = 94 / 135


@pytest.mark.parametrize("num_bins", [None, 7, 2**20])
def test_aupro_hand_computed_two_regions(num_bins: int | None) -> None:
    # Binning only drops curve vertices. With 7 bins over [0, 0.9] the merged thresholds are
    # {0.9, 0.8} (both at FPR 0) and below 0.3: the area up to 0.3 is unchanged. 2**20 bins exceed
    # the 10 pixels, which switches to the exact sweep.
    assert aupro([TOY_MASK], [TOY_MAP], num_bins=num_bins) == pytest.approx(TOY_AUPRO)


def test_aupro_coarse_bins_replace_the_curve_by_its_chord() -> None:
    # 2 bins split at 0.45: the top bin holds 0.9, 0.8, 0.7, 0.6, 0.6, so the curve jumps from (0, 0)
    # straight to (1/3, 5/6). The chord has slope 5/2: PRO(0.3) = 0.75, area 0.3 * 0.75 / 2,
    # normalised 0.375 -- different from the exact value, so the binned path is really exercised.
    assert aupro([TOY_MASK], [TOY_MAP], num_bins=2) == pytest.approx(0.375)


def test_aupro_pools_over_images() -> None:
    # Splitting the toy between pixels 4 and 5 keeps both regions whole: the pooled value is unchanged.
    masks = [TOY_MASK[:, :5], TOY_MASK[:, 5:]]
    maps = [TOY_MAP[:, :5], TOY_MAP[:, 5:]]
    assert aupro(masks, maps) == pytest.approx(TOY_AUPRO)


def test_aupro_uses_eight_connectivity() -> None:
    # (0,0),(0,1) and the diagonal neighbour (1,2) form ONE region of 3 pixels under 8-connectivity.
    # Only (1,2) scores above every normal pixel, so PRO = 1/3 for all FPR in (0, 1) -> AUPRO = 1/3.
    # With 4-connectivity there would be two regions (sizes 2 and 1) and PRO = (0 + 1)/2 = 1/2.
    mask = np.zeros((3, 3), dtype=bool)
    mask[0, 0] = mask[0, 1] = mask[1, 2] = True
    amap = np.array([[-1.0, -1.0, 0.1], [0.2, 0.3, 1.0], [0.4, 0.5, 0.6]])
    assert aupro([mask], [amap]) == pytest.approx(1 / 3)


def test_pro_curve_endpoints() -> None:
    fpr, pro = pro_curve([TOY_MASK], [TOY_MAP], num_bins=None)
    assert (fpr[0], pro[0]) == (0.0, 0.0)
    assert fpr[-1] == pytest.approx(1.0) and pro[-1] == pytest.approx(1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(pro) >= -1e-12)


def test_aupro_equals_partial_roc_area_for_a_single_region() -> None:
    # One region -> PRO is exactly the pixel TPR, so the curve is sklearn's ROC curve.
    rng = np.random.default_rng(5)
    mask = np.zeros((20, 20), dtype=bool)
    mask[4:12, 6:15] = True
    amap = np.round(rng.random((20, 20)) + 0.4 * mask, 1)  # rounding creates many ties
    fpr, tpr, _ = roc_curve(mask.ravel(), amap.ravel())
    k = np.searchsorted(fpr, 0.3)
    ref = np.trapezoid(np.append(tpr[:k], np.interp(0.3, fpr, tpr)), np.append(fpr[:k], 0.3)) / 0.3
    assert aupro([mask], [amap], num_bins=None) == pytest.approx(ref)
    assert aupro([mask], [amap], max_fpr=1.0, num_bins=None) == pytest.approx(
        roc_auc_score(mask.ravel(), amap.ravel()))


def test_binned_aupro_is_close_to_exact() -> None:
    rng = np.random.default_rng(7)
    masks = _random_masks(rng, n=8, side=64)
    maps = [rng.normal(size=m.shape).astype(np.float32) + 1.5 * m for m in masks]
    exact = aupro(masks, maps, num_bins=None)
    assert 0.2 < exact < 0.99  # a non-trivial curve, otherwise the comparison proves little
    assert aupro(masks, maps, num_bins=8192) == pytest.approx(exact, abs=1e-4)  # 32768 px > bins
    assert aupro(masks, maps, num_bins=64) == pytest.approx(exact, abs=2e-2)


def test_aupro_rejects_bad_max_fpr() -> None:
    with pytest.raises(ValueError, match="max_fpr"):
        aupro([TOY_MASK], [TOY_MAP], max_fpr=0.0)


def test_compute_metrics_keys_and_range() -> None:
    rng = np.random.default_rng(11)
    masks = _random_masks(rng)
    maps = [rng.random(m.shape, dtype=np.float32) + m for m in masks]
    labels = [int(m.any()) for m in masks]
    scores = [float(m.max()) for m in maps]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = compute_metrics(labels, scores, masks, maps)
    assert tuple(out) == QUALITY_METRICS
    assert all(0.0 <= v <= 1.0 for v in out.values())


def test_binned_pixel_metrics_match_exact_sklearn_on_large_inputs():
    """Inputs above 2 x 2**20 pixels are binned; the result must equal scikit-learn on raw pixels."""
    from sklearn.metrics import precision_recall_curve, roc_auc_score

    from clipshot.evaluation.metrics import pixel_auroc, pixel_f1max

    rng = np.random.default_rng(0)
    masks = [rng.random((1100, 1100)) < 0.05 for _ in range(2)]
    maps = [m * 0.3 + rng.random(m.shape).astype(np.float32) for m in masks]
    y = np.concatenate([m.ravel() for m in masks])
    s = np.concatenate([m.ravel() for m in maps])
    assert pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(y, s), abs=1e-5)
    precision, recall, _ = precision_recall_curve(y, s)
    exact_f1 = np.max(2 * precision * recall / np.maximum(precision + recall, 1e-12))
    assert pixel_f1max(masks, maps) == pytest.approx(exact_f1, abs=1e-4)
