"""From a coarse patch grid to a smooth pixel heatmap."""

from __future__ import annotations

import functools
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
    upsampled and smoothed one by one (no smoothing across a tile seam).

    Computed as ``gaussian_blur(upsample(maps))`` (equal within fp32 rounding, tested) but in one step: both are
    separable linear maps, so the pair is ``A @ map @ B^T`` with A = (H, h) and B = (W, w) built once per grid,
    frame and sigma (``axis_operator``). Two small matmuls instead of a full-frame resize and two 33-tap
    convolutions: the convolutions were most of the scoring time besides the memory search on CPU."""
    frame = (size, size) if isinstance(size, int) else (size[0], size[1])
    n, rows, cols = patch_maps.shape
    if sigma <= 0:  # no smoothing: the resize alone is cheaper than the operator matmuls
        return upsample(patch_maps.reshape(n * views, rows // views, cols), frame).reshape(n, views * frame[0],
                                                                                            frame[1])
    tiles = patch_maps.float().reshape(n * views, rows // views, cols)
    left = axis_operator(rows // views, frame[0], float(sigma), tiles.device)
    right = axis_operator(cols, frame[1], float(sigma), tiles.device)
    out = torch.matmul(torch.matmul(left, tiles), right.t())
    return out.reshape(n, views * frame[0], frame[1])


@functools.lru_cache(maxsize=64)
def axis_operator(cells: int, pixels: int, sigma: float, device: torch.device) -> torch.Tensor:
    """(pixels, cells) float32 matrix of one axis of ``pixel_map``: bilinear upsampling (align_corners=False)
    from ``cells`` to ``pixels``, then the Gaussian of ``gaussian_blur`` with its reflect padding.

    Built in float64 by sending each cell's unit impulse through the same torch ops ``upsample`` and
    ``gaussian_blur`` use, so edge handling (source clamping, reflection) is theirs by construction. Cached, so
    built outside inference mode (a cached inference tensor could not enter a later autograd graph)."""
    with torch.inference_mode(False), torch.no_grad():
        impulses = torch.eye(cells, dtype=torch.float64)[None]  # (1, cells, cells): channel i = impulse at cell i
        lines = F.interpolate(impulses, size=pixels, mode="linear", align_corners=False)[0]  # (cells, pixels)
        kernel = _gaussian_kernel(sigma, lines.device).double()
        pad = kernel.numel() // 2
        lines = F.conv1d(F.pad(lines[:, None], (pad, pad), mode="reflect"), kernel.view(1, 1, -1))[:, 0]
        return lines.t().float().contiguous().to(device)


# How a map is shown to people (the service overlay and the eval figures share it): untinted at or below the
# threshold, a YlOrRd tint (its pale start skipped) from the threshold up to twice the threshold.
OVERLAY_COLORMAP = "YlOrRd"
OVERLAY_COLORMAP_START = 0.25
UNCALIBRATED_THRESHOLD = 0.5  # middle of the [0, 1] score range every branch produces


def colour_scale(threshold: float | None) -> tuple[float, float]:
    """(vmin, vmax) for showing a map: vmin is the threshold (untinted at or below it, so the picture marks
    exactly the pixels that made the verdict), vmax = 2 x threshold, so two pictures can be compared by eye. A
    threshold under 1 caps vmax at 1, the top of a distance or probability; maps divided by a product's normal
    level (``clipshot.position_baseline``) are ratios with thresholds past 1, and keep 2 x threshold. An
    uncalibrated adapter uses ``UNCALIBRATED_THRESHOLD``."""
    t = UNCALIBRATED_THRESHOLD if threshold is None or not math.isfinite(threshold) else float(threshold)
    t = max(t, 0.0)
    return t, max(2.0 * t if t >= 1.0 else min(2.0 * t, 1.0), t + 0.01)
