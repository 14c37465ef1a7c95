"""``pixel_map`` computed as two operator matmuls equals the resize-then-blur it replaces.

The reference is the two-step form the service used before (``gaussian_blur(upsample(maps))``, tile by tile), kept
here on purpose: the operator form must give the same maps, and so the same image scores and verdicts, on real
memory maps (bottle 900x900 squashed to 320x320, ball screw 1130x460 on its native 208x496 frame) and on
synthetic grids with tiles, other sigmas and frames that are not multiples of the grid."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from clipshot.anomaly_map import axis_operator, gaussian_blur, pixel_map, upsample
from clipshot.evaluation import list_test_samples, list_train_good, select_shots
from clipshot.fusion import image_score
from tests.conftest import REPO
from tests.helpers.data import require_data

SHARED = REPO.parent / "shared" / "data"
DATASETS = {"bottle": SHARED / "mvtec_ad", "ball_screw": SHARED / "bsdata"}
# Maps lie in [0, 1]; each pixel is a sum of ~33 x 33 fp32 products either way, so the two orders of summation
# differ by ~4e-7 (measured). 1e-5 leaves room for other BLAS kernels and stays 20x under the runtime parity bar
# for maps and scores (tests/helpers/runtimes.py: 2e-4), which is what a verdict may move by.
MAP_TOL = 1e-5


def reference(maps: torch.Tensor, frame: tuple[int, int], sigma: float, views: int) -> torch.Tensor:
    """The former ``pixel_map``: bilinear upsample to the frame, then the separable Gaussian, per tile."""
    n, rows, cols = maps.shape
    tiles = maps.reshape(n * views, rows // views, cols)
    return gaussian_blur(upsample(tiles, frame), sigma).reshape(n, views * frame[0], frame[1])


@pytest.mark.parametrize(("shape", "frame", "sigma", "views"), [
    ((3, 40, 40), (320, 320), 4.0, 1),    # EfficientNet-Lite0 squash
    ((2, 26, 62), (208, 496), 4.0, 1),    # native frame of a 1130x460 upload
    ((2, 120, 40), (320, 320), 4.0, 3),   # three tiles stacked vertically
    ((1, 15, 15), (240, 240), 2.0, 1),    # ViT-B/16+ grid, another sigma
    ((2, 7, 9), (61, 77), 8.0, 1),        # frame not a multiple of the grid, wide kernel
    ((1, 8, 8), (64, 64), 0.0, 1),        # no smoothing
])
def test_operator_form_equals_resize_then_blur(shape, frame, sigma, views):
    maps = torch.rand(shape, generator=torch.Generator().manual_seed(sum(shape)))
    got, want = pixel_map(maps, frame, sigma, views=views), reference(maps, frame, sigma, views)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= MAP_TOL


def test_operator_is_built_once_and_usable_under_autograd():
    """Cached per (grid, frame, sigma, device); built outside inference mode so a later gradient can pass it."""
    with torch.inference_mode():
        first = axis_operator(11, 97, 4.0, torch.device("cpu"))
    assert axis_operator(11, 97, 4.0, torch.device("cpu")) is first
    maps = torch.rand(1, 11, 11, requires_grad=True)
    pixel_map(maps, (97, 97), 4.0).sum().backward()
    assert maps.grad is not None and maps.grad.abs().sum() > 0


@pytest.fixture(scope="module")
def detector():
    from clipshot.backbone import load_backbone
    from clipshot.detector import Detector

    return Detector(load_backbone("imagenet:efficientnet-lite0"))


@pytest.mark.parametrize("category", sorted(DATASETS))
def test_real_memory_maps_scores_and_verdicts_unchanged(detector, category):
    """Shipped defaults fitted on 4 shots; 6 test images (good and defective) scored both ways."""
    root = DATASETS[category]
    require_data(root / category / "test")
    shots = [Image.open(p).convert("RGB")
             for p in select_shots(list_train_good(root, category), 4, category=category, seed=0)]
    adapter = detector.fit_memory(shots, category=category)
    samples = list_test_samples(root, category)
    images = [Image.open(s.path).convert("RGB") for s in samples[:: max(1, len(samples) // 6)][:6]]
    frame = adapter.geometry.frame_of(detector.backbone.image_size)
    with torch.inference_mode():
        feats = detector.features(detector.backbone.preprocess(images, adapter.geometry), adapter,
                                  dpam=adapter.scoring.dpam)
        raw = adapter.memory.distances(feats.per_image(adapter.geometry.views_per_image))
        views = adapter.geometry.views_per_image
        got = pixel_map(raw, frame, adapter.scoring.sigma, views=views)
        want = reference(raw, frame, adapter.scoring.sigma, views)
        scores, maps = detector.score_features(feats.per_image(views), adapter)
    assert (got - want).abs().max().item() <= MAP_TOL
    assert torch.equal(maps, got)  # the detector's maps are this operator form
    old_scores = image_score(None, want, adapter.scoring)
    assert (scores - old_scores).abs().max().item() <= MAP_TOL
    threshold = adapter.threshold
    assert threshold is not None
    assert ((scores > threshold) == (old_scores > threshold)).all()
