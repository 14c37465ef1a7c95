"""From a coarse patch grid to a smooth pixel heatmap."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SIGMA = 4.0


def _gaussian_kernel(sigma: float, device: torch.device) -> torch.Tensor:
    radius = max(1, int(math.ceil(4 * sigma)))
    x = torch.arange(-radius, radius + 1, device=device, dtype=torch.float32)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    return kernel / kernel.sum()


def gaussian_blur(maps: torch.Tensor, sigma: float = SIGMA) -> torch.Tensor:
    """Separable Gaussian (two 1-D passes, reflect padding) on (B, H, W) maps."""
    if sigma <= 0:
        return maps
    kernel = _gaussian_kernel(sigma, maps.device)
    pad = kernel.numel() // 2
    x = maps.float()[:, None]
    x = F.conv2d(F.pad(x, (pad, pad, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, pad, pad), mode="reflect"), kernel.view(1, 1, -1, 1))
    return x[:, 0]


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of (B, h, w) maps to ``size`` = (H, W)."""
    return F.interpolate(maps.float()[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def pixel_map(patch_maps: torch.Tensor, size: int | tuple[int, int], sigma: float = SIGMA,
              views: int = 1) -> torch.Tensor:
    """Patch grid -> model-input-resolution heatmap, smoothed. Smoothing at the fixed model resolution
    (not at each upload's size) keeps the map, and the image score taken from it, independent of upload size.

    ``size`` is the model frame (H, W); with ``views`` > 1 each map holds that many tiles stacked vertically,
    upsampled and smoothed one by one (no smoothing across a tile seam)."""
    frame = (size, size) if isinstance(size, int) else (size[0], size[1])
    if views == 1:
        return gaussian_blur(upsample(patch_maps, frame), sigma)
    n, rows, cols = patch_maps.shape
    tiles = patch_maps.reshape(n * views, rows // views, cols)
    return gaussian_blur(upsample(tiles, frame), sigma).reshape(n, views * frame[0], frame[1])


# How a map is shown to people (the service overlay and the eval figures share it): untinted at or below the
# threshold, a YlOrRd tint (its pale start skipped) from the threshold up to twice the threshold.
OVERLAY_COLORMAP = "YlOrRd"
OVERLAY_COLORMAP_START = 0.25
UNCALIBRATED_THRESHOLD = 0.5  # middle of the [0, 1] score range every branch produces


def colour_scale(threshold: float | None) -> tuple[float, float]:
    """(vmin, vmax) for showing a map: vmin is the threshold (untinted at or below it), vmax = 2 x threshold
    (capped at 1, the top of every score range), so two pictures can be compared by eye. An uncalibrated
    adapter uses ``UNCALIBRATED_THRESHOLD``."""
    t = UNCALIBRATED_THRESHOLD if threshold is None or not math.isfinite(threshold) else float(threshold)
    t = min(max(t, 0.0), 0.99)
    return t, max(min(2.0 * t, 1.0), t + 0.01)
