"""A score and its frame-resolution map -> the verdict and a heatmap over the whole image.

Kept apart from ``Detector`` because it is CPU post-processing that needs no backbone: the service runs it off
the device worker (``app.serving.inference``) for results the device already produced, and ``Detector.predict``
runs the same function, so both paths decide and map back alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from clipshot.adapter import Adapter
from clipshot.fusion import map_threshold


@dataclass
class Prediction:
    score: float
    threshold: float | None
    is_anomalous: bool | None
    anomaly_map: np.ndarray | None  # float32 (H, W)
    map_threshold: float | None = None  # map pixels above it made the verdict (``fusion.map_threshold``)


def make_prediction(score: float, heat: torch.Tensor, adapter: Adapter, image_size: tuple[int, int],
                    map_size: tuple[int, int] | str | None) -> Prediction:
    """Verdict plus the heatmap mapped back onto the image (CPU post-processing, off the device worker).

    ``heat`` is the (views * H, W) frame-resolution map; the result covers the whole image at ``map_size``:
    "input" (the image's own size), (H, W), or None (no map)."""
    threshold = adapter.threshold
    heatmap = None
    if map_size is not None:
        size = (image_size[1], image_size[0]) if isinstance(map_size, str) else (map_size[0], map_size[1])
        if adapter.geometry.is_plain:
            heatmap = F.interpolate(heat[None, None].float().cpu(), size=size, mode="bilinear",
                                    align_corners=False)[0, 0].numpy()
        else:  # a legacy frame-less geometry is square: the map's width is its side
            heatmap = adapter.geometry.map_back(heat, image_size, heat.shape[-1], size)
    verdict = None if threshold is None else bool(score > threshold)
    return Prediction(float(score), threshold, verdict, heatmap, map_threshold(threshold, heat, adapter.scoring))
