"""The shipped decision rule on real images (../shared): 4 good shots by the eval's rule (seed 0), offline
EfficientNet-Lite0, the verdict at the adapter's own threshold. Skips cleanly when the data is absent."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from clipshot.evaluation import list_test_samples, list_train_good, select_shots
from tests.conftest import REPO

SHARED = REPO.parent / "shared" / "data"
DATASETS = {"bottle": SHARED / "mvtec_ad", "ball_screw": SHARED / "bsdata"}


@pytest.fixture(scope="module")
def detector():
    from clipshot.backbone import load_backbone
    from clipshot.detector import Detector

    return Detector(load_backbone("imagenet:efficientnet-lite0"))


def _verdicts(detector, category: str) -> tuple[np.ndarray, np.ndarray]:
    root = DATASETS[category]
    if not (root / category / "test").is_dir():
        pytest.skip(f"{root / category} is absent")
    shots = [Image.open(p).convert("RGB") for p in select_shots(list_train_good(root, category), 4,
                                                                  category=category, seed=0)]
    adapter = detector.fit_memory(shots, category=category)  # shipped defaults: auto geometry, auto policy
    samples = list_test_samples(root, category)
    preds = [detector.predict([Image.open(s.path).convert("RGB")], adapter, map_size=None)[0] for s in samples]
    return np.array([s.label for s in samples], bool), np.array([p.is_anomalous for p in preds], bool)


def _f1(labels: np.ndarray, flagged: np.ndarray) -> float:
    tp = np.sum(flagged & labels)
    return 2 * tp / (2 * tp + np.sum(flagged & ~labels) + np.sum(~flagged & labels))


def test_bottle_threshold_catches_defects_without_rejecting_good_parts(detector):
    labels, flagged = _verdicts(detector, "bottle")
    # Issue bars: F1 within 2 points of F1-max (99.7) and no seed rejecting more than 10 % of good parts.
    # Measured on seed 0: F1 0.984, 5 % false alarms; the old rule had 98.6 mean but 15 % on one seed.
    assert _f1(labels, flagged) >= 0.95
    assert flagged[~labels].mean() <= 0.10


def test_ball_screw_threshold_flags_pitting(detector):
    labels, flagged = _verdicts(detector, "ball_screw")
    # The old rule flagged none of the 110 pitted frames (recall 0, F1 0). Measured on seed 0: recall 0.74,
    # F1 0.82 (F1-max 0.83), 10 % false alarms; 0.5 / 0.70 fail any threshold parked above the defects
    # while leaving room for CPU-to-CPU float noise.
    assert flagged[labels].mean() >= 0.5
    assert _f1(labels, flagged) >= 0.70
    assert flagged[~labels].mean() <= 0.5  # and it does not get there by flagging everything
