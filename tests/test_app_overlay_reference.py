"""The overlay's cheaper composition draws what the straightforward one drew: the map upsampled over the whole
picture, one crop over all kept areas, scipy's erosion for the contour, Pillow's composite — kept here as the
reference, run on a generated photo and map at the sizes the service uses."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import textured
from PIL import Image
from scipy import ndimage

from app.serving.heatmap import (
    _PALETTE,
    ALPHA_MAX,
    ALPHA_MIN,
    CONTOUR_RGB,
    OVERLAY_REGIONS,
    badge_side,
    hot_window,
    number_badge,
    output_size,
    overlay_image,
    rank_components,
    upsample,
)

VMIN, VMAX = 0.5, 1.0
# A palette step moves a channel by at most 2 levels (max |diff| of neighbouring YlOrRd entries), and the window's
# map values equal the full upsample's within float32 rounding, so a colour index on a rounding boundary may
# move one step: at most 2 levels, on a handful of pixels. A missing or misplaced tint, contour or badge moves
# pixels by tens of levels, over hundreds of pixels.
MAX_LEVELS = 2
MAX_CHANGED = 1e-4  # share of pixels that may differ at all (measured: 0 to 10 pixels of 810 000 on bottle maps)


def reference_overlay(image: Image.Image, heat: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The overlay as composed before: every step on the whole picture or on the union of the kept areas."""
    big = upsample(heat, size)
    out = image.convert("RGB")
    out = out.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0) if out.size != size else out.copy()
    comp = rank_components(big, VMIN)
    if comp is None:
        return np.asarray(out)
    kept = comp.order[:OVERLAY_REGIONS]
    above = np.zeros(big.shape, dtype=bool)
    above[comp.window] = np.isin(comp.labels, kept)
    rows, cols = np.flatnonzero(above.any(axis=1)), np.flatnonzero(above.any(axis=0))
    width = max(1, round(max(size) / 400))
    y0, y1 = max(0, rows[0] - width - 1), min(size[1], rows[-1] + width + 2)
    x0, x1 = max(0, cols[0] - width - 1), min(size[0], cols[-1] + width + 2)
    crop, hot = big[y0:y1, x0:x1], above[y0:y1, x0:x1]
    crop_size = (x1 - x0, y1 - y0)
    level = np.clip((crop - VMIN) * (1.0 / (VMAX - VMIN)), 0.0, 1.0)
    index = Image.frombytes("P", crop_size, (level * 255.0 + 0.5).astype(np.uint8).tobytes())
    index.putpalette(_PALETTE.tobytes())
    alpha = np.where(hot, (ALPHA_MIN + (ALPHA_MAX - ALPHA_MIN) * level) * 255.0 + 0.5, 0.0).astype(np.uint8)
    box = (x0, y0, x1, y1)
    tinted = np.array(Image.composite(index.convert("RGB"), out.crop(box), Image.fromarray(alpha, "L")))
    tinted[hot & ~ndimage.binary_erosion(hot, iterations=width, border_value=1)] = CONTOUR_RGB
    out.paste(Image.fromarray(tinted), box)
    side = badge_side(out.size)
    slices = ndimage.find_objects(comp.labels)
    for rank, label in enumerate(kept, start=1):
        top, left = slices[label - 1][0].start + comp.window[0].start, slices[label - 1][1].start + comp.window[1].start
        y = top - side if top >= side else top
        x = min(max(0, left), max(0, out.width - side))
        out.paste(number_badge(rank, side), (x, min(y, max(0, out.height - side))))
    return np.asarray(out)


def blob_map(shape: tuple[int, int], seed: int) -> np.ndarray:
    """A model-resolution map with areas above VMIN: large and small, apart and close (two of them one cell
    apart), one cut by the picture's edge, and more of them than the overlay keeps."""
    rng = np.random.default_rng(seed)
    rows, cols = shape
    yy, xx = np.mgrid[0:rows, 0:cols] / max(shape)
    heat = rng.uniform(0.0, 0.3, shape).astype(np.float32)
    blobs = [(0.2, 0.3, 0.95, 0.05), (0.2, 0.43, 0.9, 0.04), (0.5, 0.0, 0.85, 0.08), (0.6, 0.6, 0.8, 0.12),
             (0.1, 0.9, 0.7, 0.02), (0.55, 1.2, 0.6, 0.06)]
    for cy, cx, peak, radius in blobs:
        heat = np.maximum(heat, peak * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * radius ** 2)))
    return heat.astype(np.float32)


PHOTO = Image.fromarray(textured(5, 300)).resize((900, 600), Image.Resampling.BICUBIC)


@pytest.mark.parametrize(("grid", "asked"), [
    ((40, 60), None),  # a model grid stretched over the whole 900x600 photo (the photo is not resized)
    ((40, 60), 300),  # a smaller picture: the photo is resized, the map still stretched
    ((320, 480), 300),  # a map finer than the picture (a tiled geometry mapped back): the map is shrunk
    ((202, 496), 1024),  # the ball screw's native grid on a photo of another aspect
])
@pytest.mark.parametrize("seed", [0, 1])
def test_overlay_matches_the_straightforward_composition(grid, asked, seed):
    heat = blob_map(grid, seed)
    size = output_size(PHOTO.size, asked)
    expected = reference_overlay(PHOTO, heat, size).astype(int)
    assert (np.abs(expected - np.asarray(PHOTO.resize(size))).sum(axis=-1) > 30).mean() > 0.005  # tinted: a real case
    got = np.asarray(overlay_image(PHOTO, heat, vmin=VMIN, vmax=VMAX, size=size)).astype(int)
    diff = np.abs(got - expected).max(axis=-1)
    assert diff.max() <= MAX_LEVELS, (diff.max(), np.argwhere(diff > MAX_LEVELS)[:5])
    assert (diff > 0).mean() <= MAX_CHANGED, (diff > 0).sum()


def test_a_normal_part_is_returned_as_photographed_without_a_copy():
    """Nothing above the threshold: the upload itself comes back (no upsample, no copy: the line's common case)."""
    heat = np.full((40, 60), 0.2, dtype=np.float32)
    assert overlay_image(PHOTO, heat, vmin=VMIN, vmax=VMAX) is PHOTO
    small = overlay_image(PHOTO, heat, vmin=VMIN, vmax=VMAX, size=(300, 200))
    assert np.array_equal(np.asarray(small), np.asarray(PHOTO.resize((300, 200), Image.Resampling.BILINEAR)))


@pytest.mark.parametrize("grid", [(40, 60), (202, 496), (320, 480), (7, 3)])
@pytest.mark.parametrize("size", [(900, 600), (300, 200), (64, 26), (61, 59)])
def test_hot_window_holds_every_pixel_above_and_the_full_upsample_values(grid, size):
    """Every pixel of the full upsample above the threshold lies inside the window (a window cut too tight
    would drop part of an area's tint), and the values there are the full upsample's within float32 rounding
    (1e-6 on scores in [0, 1]; the window starts on whole grid cells, so only the last bit or two differs)."""
    heat = blob_map(grid, 3)
    full = upsample(heat, size)
    values, (top, left) = hot_window(heat, size, VMIN)
    inside = np.zeros(full.shape, dtype=bool)
    inside[top:top + values.shape[0], left:left + values.shape[1]] = True
    assert (full > VMIN).any() and not ((full > VMIN) & ~inside).any()
    assert np.abs(values - full[top:top + values.shape[0], left:left + values.shape[1]]).max() <= 1e-6
    assert hot_window(np.full(grid, 0.2, dtype=np.float32), size, VMIN) is None


def test_hot_window_around_one_cell_is_a_few_cells_wide():
    """One hot cell of a 40x60 grid on a 900x600 picture (15 px a cell): the window covers the cell, its
    bilinear reach and the alignment to whole cells, 60 px a side at most (4 cells), not the picture."""
    heat = np.zeros((40, 60), dtype=np.float32)
    heat[20, 30] = 1.0
    values, (top, left) = hot_window(heat, (900, 600), VMIN)
    assert values.shape[0] <= 60 and values.shape[1] <= 60 and top <= 300 < top + values.shape[0]
