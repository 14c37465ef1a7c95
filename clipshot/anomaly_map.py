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


def pixel_map(patch_maps: torch.Tensor, size: int, sigma: float = SIGMA) -> torch.Tensor:
    """Patch grid -> model-input-resolution heatmap, smoothed. Smoothing at the fixed model resolution
    (not at each upload's size) keeps the map, and the image score taken from it, independent of upload size."""
    return gaussian_blur(upsample(patch_maps, (size, size)), sigma)


def colour_scale(threshold: float | None) -> tuple[float, float]:
    """(vmin, vmax) for showing a map to people: 0 .. 2 x threshold, so the threshold sits mid-scale and a
    good part looks calm next to a defect. The service overlay and the eval figures share it. Uncalibrated
    adapters fall back to the maps' natural [0, 1] range."""
    if threshold is None or not math.isfinite(threshold) or threshold <= 0:
        return 0.0, 1.0
    return 0.0, 2.0 * float(threshold)
