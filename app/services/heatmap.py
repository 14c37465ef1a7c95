"""Heatmap encodings for the predict response: a PNG overlay for people, a float16 grid for programs.

The PNG uses a fixed colour scale anchored at the adapter's threshold (threshold = middle of the
colour map, 2 x threshold = full red) instead of stretching each map to its own min/max: a good part
then looks calm and a defect looks hot, and two responses can be compared by eye. Uncalibrated
adapters fall back to the maps' natural [0, 1] range.
"""

from __future__ import annotations

import base64
import io

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.colors import Normalize
from PIL import Image

COLORMAP = "jet"
OVERLAY_ALPHA = 0.5
PNG_COMPRESS_LEVEL = 1  # fast: the overlay is regenerated per request, bandwidth is rarely the limit


def colour_scale(threshold: float | None) -> tuple[float, float]:
    """(vmin, vmax) of the overlay: the threshold sits mid-scale when there is one."""
    if threshold is None or not np.isfinite(threshold) or threshold <= 0:
        return 0.0, 1.0
    return 0.0, 2.0 * float(threshold)


def png_overlay(image: Image.Image, heat: np.ndarray, *, vmin: float, vmax: float) -> bytes:
    """``heat`` (H, W) at the image's size, colour-mapped and alpha-blended over the image, as PNG bytes."""
    if heat.shape != (image.height, image.width):
        raise ValueError(f"heatmap shape {heat.shape} does not match image size {image.size}")
    rgba = colormaps[COLORMAP](Normalize(vmin=vmin, vmax=vmax, clip=True)(heat), bytes=True)
    colour = Image.fromarray(np.ascontiguousarray(rgba[..., :3]))
    blended = Image.blend(image.convert("RGB"), colour, OVERLAY_ALPHA)
    buffer = io.BytesIO()
    blended.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def raw_grid(heat: torch.Tensor | np.ndarray) -> tuple[bytes, list[int]]:
    """Little-endian float16 bytes of the model-resolution map, and its [height, width]."""
    array = heat.detach().cpu().numpy() if isinstance(heat, torch.Tensor) else np.asarray(heat)
    grid = np.ascontiguousarray(array.astype("<f2"))
    return grid.tobytes(), list(grid.shape)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
