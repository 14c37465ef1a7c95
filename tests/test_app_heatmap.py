"""The PNG overlay: our parallel PNG writer must produce files any decoder reads back exactly, and the
palette-based overlay must look like the reference (matplotlib colour map over a torch-resized map)."""

from __future__ import annotations

import io
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from PIL import Image

from app.services import png_encoder
from app.services.heatmap import COLORMAP, OVERLAY_ALPHA, png_overlay
from app.services.png_encoder import encode_png


def decode(data: bytes) -> np.ndarray:
    Image.open(io.BytesIO(data)).verify()  # checks every chunk's CRC
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "PNG" and im.mode == "RGB"
        return np.asarray(im)


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (9, 1), (57, 203), (300, 257)])
@pytest.mark.parametrize("threads", [1, 3])
def test_round_trip_is_exact(shape, threads):
    rgb = np.random.default_rng(sum(shape)).integers(0, 256, (*shape, 3), dtype=np.uint8)
    assert np.array_equal(decode(encode_png(rgb, threads=threads)), rgb)


def test_stream_split_into_many_pieces_stays_one_valid_zlib_stream(monkeypatch):
    """Force a piece per few rows, so every splice point (sync flush, Adler-32 over the whole) is exercised."""
    monkeypatch.setattr(png_encoder, "MIN_CHUNK_BYTES", 16)
    rgb = np.random.default_rng(0).integers(0, 256, (37, 29, 3), dtype=np.uint8)
    rgb[10:20] = 200  # runs, so RLE matches cross piece boundaries
    data = encode_png(rgb, threads=8)
    assert np.array_equal(decode(data), rgb)
    idat = data[data.index(b"IDAT") + 4: data.index(b"IEND") - 8]
    raw = zlib.decompress(idat)  # zlib itself validates the header and the Adler-32 trailer
    assert len(raw) == 37 * (29 * 3 + 1) and raw[0] == png_encoder.SUB_FILTER


def test_flat_image_compresses():
    """A flat 900x900 image is 2.4 MB raw; run-length deflate must shrink it >100x (a stored-only stream would not)."""
    rgb = np.full((900, 900, 3), 128, dtype=np.uint8)
    data = encode_png(rgb)
    assert len(data) < rgb.nbytes / 100 and np.array_equal(decode(data), rgb)


@pytest.mark.parametrize("array", [
    np.zeros((4, 4, 3), dtype=np.float32),
    np.zeros((4, 4), dtype=np.uint8),
    np.zeros((4, 4, 4), dtype=np.uint8),
    np.zeros((0, 4, 3), dtype=np.uint8),
], ids=["float", "grey", "rgba", "empty"])
def test_rejects_what_it_cannot_encode(array):
    with pytest.raises(ValueError, match="encode_png needs"):
        encode_png(array)


def reference_overlay(image: Image.Image, heat: torch.Tensor, vmin: float, vmax: float) -> np.ndarray:
    """What the overlay means: resize in float, colour-map every pixel, blend."""
    big = F.interpolate(heat[None, None], size=(image.height, image.width), mode="bilinear",
                        align_corners=False)[0, 0].numpy()
    colour = colormaps[COLORMAP](np.clip((big - vmin) / (vmax - vmin), 0, 1), bytes=True)[..., :3]
    return (1 - OVERLAY_ALPHA) * np.asarray(image, dtype=np.float64) + OVERLAY_ALPHA * colour


def test_overlay_matches_the_float_reference():
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (130, 170, 3), dtype=np.uint8))
    heat = F.avg_pool2d(torch.rand(1, 1, 48, 48) * 0.8, 5, stride=1, padding=2)[0, 0]  # a smooth map
    ours = decode(png_overlay(image, heat, vmin=0.0, vmax=0.5)).astype(np.float64)
    assert ours.shape == (130, 170, 3)
    diff = np.abs(ours - reference_overlay(image, heat, 0.0, 0.5))
    # One of 256 palette steps moves a jet channel by at most 4 (each channel ramps over 64 steps), halved by
    # the 50% blend; quantising before the resize and rounding add about one more step.
    assert diff.mean() < 1.0 and diff.max() <= 6


def test_overlay_colour_scale_is_anchored():
    """Below vmin is the cold end (blue), at/above vmax the hot end (red), whatever the image shows."""
    image = Image.new("RGB", (40, 20), (0, 0, 0))
    heat = torch.zeros(10, 20)
    heat[:, 10:] = 5.0  # far above vmax: clipped to the hottest colour
    out = decode(png_overlay(image, heat, vmin=0.0, vmax=1.0)).astype(int)
    cold, hot = out[10, 2], out[10, 37]
    assert cold[2] > 50 and cold[0] == 0 and hot[0] > 50 and hot[2] == 0


@pytest.mark.parametrize(("heat", "vmin", "vmax", "match"), [
    (torch.zeros(3), 0.0, 1.0, "2-D"),
    (torch.zeros(0, 4), 0.0, 1.0, "2-D"),
    (torch.zeros(4, 4), 1.0, 1.0, "vmax > vmin"),
])
def test_overlay_rejects_bad_maps(heat, vmin, vmax, match):
    with pytest.raises(ValueError, match=match):
        png_overlay(Image.new("RGB", (8, 8)), heat, vmin=vmin, vmax=vmax)
