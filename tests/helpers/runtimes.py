"""Parity of a runtime-backed Detector with the PyTorch one (shared by tests/test_runtime_*.py)."""

from __future__ import annotations

import copy

import torch

from clipshot.adapter import Adapter
from clipshot.detector import Detector
from clipshot.features import Features

# Tolerances, each on what the runtime can change (the features; scoring is the same PyTorch code on both sides):
# * features: L2-normalised vectors; fp32 runtimes that reorder sums and fold BatchNorm into convolutions move
#   components by ~1e-7 (measured 4e-7 worst on EfficientNet-Lite0, 3e-7 on the tiny ViT), so the export's own
#   bar (clipshot.runtimes.EXPORT_TOLERANCE, 1e-4) has two orders of headroom;
# * scores and maps: cosine distances of those features, smoothed; a feature error e moves a distance by at most
#   ~2e (both vectors unit length), so 2e-4; measured 2e-8 on bottle.
FEATURE_TOL = 1e-4
SCORE_TOL = 2e-4
# * scores and maps in bf16 memory scoring (``memory_precision`` bf16: the CPU default where bf16 is native):
#   the same features, but a feature moved by ~1e-7 can land on the other side of a bf16 rounding, which moves
#   one product term of a cosine by one bf16 step (2^-8 of it) or the shifted cosine by 2^-8 of (cosine - 1):
#   well under 2^-8 of a distance in all (measured 2.6e-4 on paper); verdicts stay identical on the samples.
BF16_SCORE_TOL = 2.0**-8


def _scored(detector: Detector, feats: Features, adapter: Adapter, precision: str) -> tuple[torch.Tensor, ...]:
    """``detector.score_features`` with memory distances in ``precision``, whatever the detector's default."""
    scored = copy.copy(adapter)
    scored.backbone = {**(adapter.backbone or {}), "memory_precision": precision}
    default, detector.memory_precision = detector.memory_precision, precision
    try:
        return detector.score_features(feats, scored)
    finally:
        detector.memory_precision = default


def parity(reference: Detector, runtime: Detector, pixels: torch.Tensor, adapter: Adapter) -> dict[str, float]:
    """Worst |runtime - torch| of the features, image scores and maps of ``pixels`` under ``adapter``, with memory
    scoring in fp32 and (``bf16_*``) in bf16, plus how many bf16 verdicts differ at the adapter's threshold."""
    dpam = adapter.scoring.dpam
    with torch.inference_mode():
        want, got = reference.features(pixels, adapter, dpam=dpam), runtime.features(pixels, adapter, dpam=dpam)
        views = adapter.geometry.views_per_image
        worst: dict[str, float] = {}
        for precision, prefix in (("fp32", ""), ("bf16", "bf16_")):
            want_scores, want_maps = _scored(reference, want.per_image(views), adapter, precision)
            got_scores, got_maps = _scored(runtime, got.per_image(views), adapter, precision)
            worst[f"{prefix}scores"] = float((got_scores - want_scores).abs().max())
            worst[f"{prefix}maps"] = float((got_maps - want_maps).abs().max())
            if precision == "bf16" and adapter.threshold is not None:
                worst["bf16_verdict_flips"] = float(((got_scores > adapter.threshold)
                                                     != (want_scores > adapter.threshold)).sum())
    assert got.grid == want.grid and len(got.patches) == len(want.patches)
    assert (got.cls is None) == (want.cls is None)
    pairs = list(zip(got.patches, want.patches, strict=True)) + ([] if want.cls is None else [(got.cls, want.cls)])
    return {"features": max(float((g - w).abs().max()) for g, w in pairs), **worst}


def assert_parity(reference: Detector, runtime: Detector, pixels: torch.Tensor, adapter: Adapter) -> dict:
    worst = parity(reference, runtime, pixels, adapter)
    assert worst["features"] <= FEATURE_TOL, worst
    assert worst["scores"] <= SCORE_TOL and worst["maps"] <= SCORE_TOL, worst
    assert worst["bf16_scores"] <= BF16_SCORE_TOL and worst["bf16_maps"] <= BF16_SCORE_TOL, worst
    assert worst.get("bf16_verdict_flips", 0) == 0, worst
    return worst
