"""The shipped decision rule on real images (../shared): 4 good shots by the eval's rule (seed 0), offline
EfficientNet-Lite0, the verdict at the adapter's own threshold. Skips cleanly when the data is absent.

These pin the shipped defaults on the shared sets; the full gate for changing a default is
``benchmarks/accuracy_suite.py`` over every dataset, every seed."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from clipshot.evaluation import list_test_samples, list_train_good, select_shots
from tests.conftest import REPO
from tests.helpers.data import require_data

SHARED = REPO.parent / "shared" / "data"
DATASETS = {"bottle": SHARED / "mvtec_ad", "ball_screw": SHARED / "bsdata", "paper_brg01_rl": SHARED / "piped"}


@pytest.fixture(scope="module")
def detector():
    from clipshot.backbone import load_backbone
    from clipshot.detector import Detector

    return Detector(load_backbone("imagenet:efficientnet-lite0"))


@functools.cache
def _verdicts(detector, category: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels, verdicts, scores) of the test set, computed once per category for the module's detector."""
    root = DATASETS[category]
    require_data(root / category / "test")  # skipped without ../shared, failed under CI
    shots = [Image.open(p).convert("RGB") for p in select_shots(list_train_good(root, category), 4,
                                                                  category=category, seed=0)]
    adapter = detector.fit_memory(shots, category=category)  # shipped defaults: auto geometry, auto policy
    samples = list_test_samples(root, category)
    preds = [detector.predict([Image.open(s.path).convert("RGB")], adapter, map_size=None)[0] for s in samples]
    return (np.array([s.label for s in samples], bool), np.array([p.is_anomalous for p in preds], bool),
            np.array([p.score for p in preds]))


def _f1(labels: np.ndarray, flagged: np.ndarray) -> float:
    tp = np.sum(flagged & labels)
    return 2 * tp / (2 * tp + np.sum(flagged & ~labels) + np.sum(~flagged & labels))


def test_bottle_threshold_catches_defects_without_rejecting_good_parts(detector):
    labels, flagged, _ = _verdicts(detector, "bottle")
    # Issue bars: F1 within 2 points of F1-max (99.7) and no seed rejecting more than 10 % of good parts.
    # Measured on seed 0: F1 0.992, no false alarms (0.984 / 5 % before issue 10's scoring); the old rule had
    # 98.6 mean but 15 % on one seed.
    assert _f1(labels, flagged) >= 0.95
    assert flagged[~labels].mean() <= 0.10


def test_ball_screw_threshold_flags_pitting(detector):
    labels, flagged, _ = _verdicts(detector, "ball_screw")
    # The old rule flagged none of the 110 pitted frames (recall 0, F1 0). Measured on seed 0: recall 0.62,
    # F1 0.76, no false alarms (0.74 / 0.82 / 10 % before issue 10's scoring); 0.5 / 0.70 fail any threshold
    # parked above the defects while leaving room for CPU-to-CPU float noise.
    assert flagged[labels].mean() >= 0.5
    assert _f1(labels, flagged) >= 0.70
    assert flagged[~labels].mean() <= 0.5  # and it does not get there by flagging everything


def test_ball_screw_ranking_with_the_shipped_scoring(detector):
    labels, _, scores = _verdicts(detector, "ball_screw")
    # The shipped scoring: origin cosine, one cosine per backbone stage, peak-mean image score. Seed 0 measures
    # 0.887 (accuracy suite); the map maximum instead of peak-mean gave 0.866 and distances around the shots' mean
    # 0.924 (the release that collapsed textures). 0.875 fails if peak-mean is lost anywhere on the way (memory,
    # calibration, prediction) and leaves room for CPU-to-CPU float noise.
    assert roc_auc_score(labels, scores) >= 0.875


def test_paper_texture_keeps_its_localisation(detector):
    # The paper texture is where distances around the shots' mean patch collapsed: the mean patch is the texture,
    # and what centring leaves is noise (pixel AUROC 0.62-0.65, image AUROC 0.92-0.95 at 4 shots). With the
    # shipped origin cosine the suite measures 0.987 image / 0.960 pixel AUROC on seed 0 (F1 at threshold 0.98).
    # 0.90 pixel / 0.95 image fail if the collapse returns and leave room for CPU-to-CPU float noise on one seed.
    root = DATASETS["paper_brg01_rl"]
    labels, _, scores = _verdicts(detector, "paper_brg01_rl")
    assert roc_auc_score(labels, scores) >= 0.95
    shots = [Image.open(p).convert("RGB") for p in select_shots(list_train_good(root, "paper_brg01_rl"), 4,
                                                                  category="paper_brg01_rl", seed=0)]
    adapter = detector.fit_memory(shots, category="paper_brg01_rl")
    pixels, truth = [], []
    for sample in list_test_samples(root, "paper_brg01_rl"):
        image = Image.open(sample.path).convert("RGB")
        heat = detector.predict([image], adapter)[0].anomaly_map
        mask = (np.zeros(heat.shape, bool) if sample.mask_path is None
                else np.asarray(Image.open(sample.mask_path).convert("L")) > 127)
        pixels.append(heat.ravel())
        truth.append(mask.ravel())
    assert roc_auc_score(np.concatenate(truth), np.concatenate(pixels)) >= 0.90
