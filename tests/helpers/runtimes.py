"""Parity of a runtime-backed Detector with the PyTorch one (shared by tests/test_runtime_*.py)."""

from __future__ import annotations

import torch

from clipshot.adapter import Adapter
from clipshot.detector import Detector

# Tolerances, each on what the runtime can change (the features; scoring is the same PyTorch code on both sides):
# * features: L2-normalised vectors; fp32 runtimes that reorder sums and fold BatchNorm into convolutions move
#   components by ~1e-7 (measured 4e-7 worst on EfficientNet-Lite0, 3e-7 on the tiny ViT), so the export's own
#   bar (clipshot.runtimes.EXPORT_TOLERANCE, 1e-4) has two orders of headroom;
# * scores and maps: cosine distances of those features, smoothed; a feature error e moves a distance by at most
#   ~2e (both vectors unit length), so 2e-4; measured 2e-8 on bottle.
FEATURE_TOL = 1e-4
SCORE_TOL = 2e-4


def parity(reference: Detector, runtime: Detector, pixels: torch.Tensor, adapter: Adapter) -> dict[str, float]:
    """Worst |runtime - torch| of the features, image scores and maps of ``pixels`` under ``adapter``."""
    dpam = adapter.scoring.dpam
    with torch.inference_mode():
        want, got = reference.features(pixels, adapter, dpam=dpam), runtime.features(pixels, adapter, dpam=dpam)
        views = adapter.geometry.views_per_image
        want_scores, want_maps = reference.score_features(want.per_image(views), adapter)
        got_scores, got_maps = runtime.score_features(got.per_image(views), adapter)
    assert got.grid == want.grid and len(got.patches) == len(want.patches)
    assert (got.cls is None) == (want.cls is None)
    pairs = list(zip(got.patches, want.patches, strict=True)) + ([] if want.cls is None else [(got.cls, want.cls)])
    return {"features": max(float((g - w).abs().max()) for g, w in pairs),
            "scores": float((got_scores - want_scores).abs().max()),
            "maps": float((got_maps - want_maps).abs().max())}


def assert_parity(reference: Detector, runtime: Detector, pixels: torch.Tensor, adapter: Adapter) -> dict:
    worst = parity(reference, runtime, pixels, adapter)
    assert worst["features"] <= FEATURE_TOL, worst
    assert worst["scores"] <= SCORE_TOL and worst["maps"] <= SCORE_TOL, worst
    return worst
