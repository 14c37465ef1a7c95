"""Shared by the test modules (first written for tests/test_app_geometry.py)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

WIDTH, HEIGHT = 150, 60  # a wide frame (aspect 2.5): the auto rule picks the native frame

def wide_png(seed: int, width: int = WIDTH, height: int = HEIGHT) -> bytes:
    rng = np.random.default_rng(seed)
    xx = np.mgrid[0:height, 0:width][1] / width
    grey = 0.5 + 0.2 * np.sin(2 * np.pi * 12 * xx) + rng.normal(0, 0.02, (height, width))
    arr = (np.clip(np.repeat(grey[..., None], 3, axis=-1), 0, 1) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()
