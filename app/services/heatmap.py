"""Heatmap encodings for the predict response: a PNG overlay for people, a float16 grid for programs.

The PNG uses a fixed colour scale anchored at the adapter's threshold (threshold = middle of the
colour map, 2 x threshold = full red) instead of stretching each map to its own min/max: a good part
then looks calm and a defect looks hot, and two responses can be compared by eye. Uncalibrated
adapters fall back to the maps' natural [0, 1] range.
"""

from __future__ import annotations

import base64

import numpy as np
import torch
from matplotlib import colormaps
from PIL import Image

from app.services.png_encoder import encode_png

COLORMAP = "jet"
OVERLAY_ALPHA = 0.5
# The colour map as a 256-entry palette: Pillow's palette lookup is ~10x cheaper than evaluating
# matplotlib's colour map on every output pixel.
_PALETTE = colormaps[COLORMAP](np.linspace(0.0, 1.0, 256), bytes=True)[:, :3].astype(np.uint8)


def colour_scale(threshold: float | None) -> tuple[float, float]:
    """(vmin, vmax) of the overlay: the threshold sits mid-scale when there is one."""
    if threshold is None or not np.isfinite(threshold) or threshold <= 0:
        return 0.0, 1.0
    return 0.0, 2.0 * float(threshold)


def png_overlay(image: Image.Image, heat: torch.Tensor | np.ndarray, *, vmin: float, vmax: float) -> bytes:
    """The model-resolution ``heat`` (h, w) resized to the image, colour-mapped, blended over it, as PNG.

    Every full-size step runs in Pillow's C loops (float resize, palette lookup, blend) or vectorised
    numpy, and the PNG writer deflates in parallel: this runs per request on the latency path.
    """
    grid = heat.detach().float().cpu().numpy() if isinstance(heat, torch.Tensor) else np.asarray(heat, np.float32)
    if grid.ndim != 2 or grid.size == 0:
        raise ValueError(f"heatmap must be a non-empty 2-D grid, got shape {grid.shape}")
    if not vmax > vmin:
        raise ValueError(f"colour scale needs vmax > vmin, got [{vmin}, {vmax}]")
    resized = np.asarray(Image.fromarray(grid, "F").resize(image.size, Image.Resampling.BILINEAR))
    index = np.clip((resized - vmin) * (255.0 / (vmax - vmin)) + 0.5, 0.0, 255.0).astype(np.uint8)
    indexed = Image.frombytes("P", image.size, index.tobytes())
    indexed.putpalette(_PALETTE.tobytes())
    colour = indexed.convert("RGB")
    blended = Image.blend(image.convert("RGB"), colour, OVERLAY_ALPHA)
    return encode_png(np.asarray(blended))


def raw_grid(heat: torch.Tensor | np.ndarray) -> tuple[bytes, list[int]]:
    """Little-endian float16 bytes of the model-resolution map, and its [height, width]."""
    array = heat.detach().cpu().numpy() if isinstance(heat, torch.Tensor) else np.asarray(heat)
    grid = np.ascontiguousarray(array.astype("<f2"))
    return grid.tobytes(), list(grid.shape)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
