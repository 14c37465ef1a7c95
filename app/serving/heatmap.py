"""Heatmap outputs of the predict response: an overlay people can read, a mask and regions programs can use.

Overlay (``jpeg``, ``png``): pixels scoring at or below the map threshold are left exactly as photographed; above
it, in the ``OVERLAY_REGIONS`` (3) strongest regions (by peak, the order of ``regions``), a yellow-to-dark-red tint
grows with the score (never opaque, so the defect's texture stays visible), the region's contour is drawn in solid
red and a red badge at its top-left corner carries its rank (1 = the strongest); weaker regions stay untinted, so
what made the verdict is what stands out. The colour scale is anchored at the prediction's map threshold (``vmin``:
the level that made the verdict, ``clipshot.fusion.map_threshold``; the adapter's threshold under the ``peak`` image
score) and saturates at ``vmax`` = twice that (capped at 1, the top of every score range), so what is tinted is
exactly what flagged the part. An uncalibrated adapter uses 0.5, the middle of the score range, and says so through
``vmin``. ``mask`` is the 1-bit picture of "map > map threshold"; ``regions`` are its connected components
(scipy.ndimage) as boxes in the uploaded image's pixel coordinates.

Every picture is at most ``max_side`` pixels on its longer side (``heatmap_size`` asks for smaller): a
2592-pixel photo would otherwise make a multi-megabyte answer and as much transient memory per request.
JPEG (Pillow, libjpeg-turbo) is the default; PNG keeps ``png_encoder``: ~1.5x faster than Pillow's PNG
writer at its fastest setting on this overlay, ~6x at its default (README, Performance).
"""

from __future__ import annotations

import base64
import functools
import io
import math
from dataclasses import dataclass

import numpy as np
import torch
from matplotlib import colormaps
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from app.serving.png_encoder import encode_png
from clipshot.anomaly_map import OVERLAY_COLORMAP, OVERLAY_COLORMAP_START, colour_scale

DEFAULT_MAX_SIDE = 1024  # longest side of any returned picture unless heatmap_size asks for less
MAX_REGIONS = 32  # the strongest regions are listed; regions_total in the answer counts all of them
OVERLAY_REGIONS = 3  # the overlay tints, outlines and numbers this many of the strongest regions, no more
JPEG_QUALITY = 85
ALPHA_MIN, ALPHA_MAX = 0.30, 0.65  # tint opacity just above the threshold and at vmax
CONTOUR_RGB = (255, 0, 0)
# Yellow (just anomalous) to dark red (vmax) as a 256-entry palette: a palette lookup in Pillow's C loop is
# ~10x cheaper than evaluating the colour map per output pixel. The pale start of YlOrRd is skipped.
_PALETTE = colormaps[OVERLAY_COLORMAP](np.linspace(OVERLAY_COLORMAP_START, 1.0, 256), bytes=True)[:, :3]
_PALETTE = _PALETTE.astype(np.uint8)


@dataclass(frozen=True)
class Region:
    """One connected area above the threshold, in the uploaded image's pixel coordinates."""

    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (x1, y1 exclusive)
    area_pct: float  # share of the image's area, in percent
    peak_score: float  # highest anomaly score inside


def output_size(image_size: tuple[int, int], heatmap_size: int | None, max_side: int = DEFAULT_MAX_SIDE
                ) -> tuple[int, int]:
    """(width, height) of a returned picture: the image's aspect, longer side <= heatmap_size and max_side."""
    width, height = image_size
    longest = min(max(width, height), heatmap_size or max_side, max_side)
    scale = longest / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _grid(heat: torch.Tensor | np.ndarray) -> np.ndarray:
    grid = heat.detach().float().cpu().numpy() if isinstance(heat, torch.Tensor) else np.asarray(heat, np.float32)
    if grid.ndim != 2 or grid.size == 0:
        raise ValueError(f"heatmap must be a non-empty 2-D grid, got shape {grid.shape}")
    return np.ascontiguousarray(grid, dtype=np.float32)


def upsample(heat: torch.Tensor | np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The model-resolution map stretched over the whole picture (bilinear, float32, shape (h, w))."""
    return np.asarray(Image.fromarray(_grid(heat), "F").resize(size, Image.Resampling.BILINEAR))


def badge_side(size: tuple[int, int]) -> int:
    """Side of the numbered square on a picture of ``size``: ~30 px on a 900 px picture, never under 11 px."""
    return max(11, round(max(size) / 30))


@functools.lru_cache(maxsize=32)
def number_badge(number: int, side: int) -> Image.Image:
    """The red square with a white rank that marks a region on the overlay (the contour's red, so it reads as
    the same mark)."""
    badge = Image.new("RGB", (side, side), CONTOUR_RGB)
    font = ImageFont.load_default(size=max(8, round(side * 0.8)))
    ImageDraw.Draw(badge).text((side / 2, side / 2), str(number), fill=(255, 255, 255), font=font, anchor="mm")
    return badge


def overlay_image(image: Image.Image, heat: torch.Tensor | np.ndarray, *, vmin: float, vmax: float,
                  size: tuple[int, int] | None = None, regions: int = OVERLAY_REGIONS) -> Image.Image:
    """The photo (resized to ``size``) with the ``regions`` strongest areas above ``vmin`` tinted (deeper towards
    ``vmax``), outlined and numbered 1, 2, 3 by peak — the order of ``regions`` in the answer.

    Why only those: on a pitted or textured part many small areas pass the threshold, and tinting all of them
    hid which one made the verdict; the weaker ones are left as photographed (``regions`` and ``mask`` still
    list and show every one). Only the bounding box of the kept areas is touched, and the map is upsampled only
    over the box that can hold a pixel above ``vmin`` (``hot_window``), so a normal part (the common case on a
    line) costs one comparison on the model-resolution grid and, where ``size`` differs, the photo's resize.
    An RGB ``image`` already at ``size`` with nothing to tint is returned itself, not copied: do not draw on it.
    """
    if not vmax > vmin:
        raise ValueError(f"colour scale needs vmax > vmin, got [{vmin}, {vmax}]")
    size = size or image.size
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    out = rgb.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0) if rgb.size != size else rgb
    found = hot_window(heat, size, vmin)
    comp = None if found is None else rank_components(found[0], vmin, origin=found[1], shape=(size[1], size[0]))
    if comp is None or found is None:
        return out
    if out is image:
        out = image.copy()
    values, origin = found
    kept = comp.order[:regions]
    width = max(1, round(max(size) / 400))  # contour: ~2 px on a 900 px picture, visible at any size
    boxes = ndimage.find_objects(comp.labels, max_label=int(kept.max()))
    wy, wx = comp.window[0].start, comp.window[1].start
    for label in kept:
        rows, cols = boxes[label - 1]
        # One crop per area, not one over all of them: on a pitted part the kept areas lie far apart. Areas are
        # 8-connected components, so no pixel of one touches another: tinting and eroding each alone gives
        # what the union gave.
        _tint(out, comp.labels[rows, cols] == label, (wy + rows.start, wx + cols.start), values, origin,
              (vmin, vmax), width)
    _number(out, [(wy + boxes[label - 1][0].start, wx + boxes[label - 1][1].start) for label in kept])
    return out


def _tint(out: Image.Image, area: np.ndarray, corner: tuple[int, int], values: np.ndarray,
          origin: tuple[int, int], scale: tuple[float, float], width: int) -> None:
    """Blend the colour of ``values`` into ``out`` over one area (``area``: its pixels in its box, whose top-left
    is ``corner`` in the picture; ``values``: the map from ``origin``) and draw its contour ``width`` px wide."""
    vmin, vmax = scale
    top, left = corner
    height, wide = area.shape
    y0, y1 = max(0, top - width - 1), min(out.height, top + height + width + 1)
    x0, x1 = max(0, left - width - 1), min(out.width, left + wide + width + 1)
    inner = np.s_[top - y0:top - y0 + height, left - x0:left - x0 + wide]
    hot = np.zeros((y1 - y0, x1 - x0), dtype=bool)
    hot[inner] = area
    crop = np.full(hot.shape, vmin, dtype=np.float32)  # only hot pixels are blended; the rest keep the photo
    crop[inner] = values[top - origin[0]:top - origin[0] + height, left - origin[1]:left - origin[1] + wide]
    crop_size, box = (x1 - x0, y1 - y0), (x0, y0, x1, y1)
    level = np.clip((crop - vmin) * (1.0 / (vmax - vmin)), 0.0, 1.0)
    index = Image.frombytes("P", crop_size, (level * 255.0 + 0.5).astype(np.uint8).tobytes())
    index.putpalette(_PALETTE.tobytes())  # Pillow's palette lookup: ~10x cheaper than indexing in numpy
    alpha = np.where(hot, (ALPHA_MIN + (ALPHA_MAX - ALPHA_MIN) * level) * 255.0 + 0.5, 0.0).astype(np.uint8)
    # A paste with a mask blends in place (Pillow's composite is a copy and this paste): mask 0 keeps the
    # photo's pixel exactly, 255 sets the contour's.
    out.paste(index.convert("RGB"), box, Image.frombytes("L", crop_size, alpha.tobytes()))
    edge = hot & ~_erode(hot, width)
    out.paste(Image.new("RGB", crop_size, CONTOUR_RGB), box,
              Image.frombytes("L", crop_size, (edge.view(np.uint8) * 255).tobytes()))


def _erode(mask: np.ndarray, iterations: int) -> np.ndarray:
    """``ndimage.binary_erosion(mask, iterations=n, border_value=1)`` with its default cross, as shifted ANDs:
    equal, and ~5x cheaper on an overlay's crop (scipy's iterated erosion dominated the contour's cost)."""
    for _ in range(iterations):
        padded = np.pad(mask, 1, constant_values=True)
        mask = (padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2]
                & padded[1:-1, 2:])
    return mask


def hot_window(heat: torch.Tensor | np.ndarray, size: tuple[int, int], threshold: float
               ) -> tuple[np.ndarray, tuple[int, int]] | None:
    """``upsample(heat, size)`` over only the box of the picture that can hold a value above ``threshold``, and
    that box's (top, left); None when no grid cell is above (then no pixel is: see below).

    Why it is enough: Pillow's bilinear resize makes each output pixel a convex combination (weights >= 0,
    normalised) of the grid cells within its filter support, so a pixel can exceed the threshold only near a
    cell that does. Upsampling a 320x320 map to 900x900 costs more than the rest of a normal part's overlay.
    Values equal the full upsample's within the last bit or two (``_span``)."""
    grid = _grid(heat)
    hot = grid > threshold - 1e-6  # a margin for float rounding: the box may be too large, never too small
    rows, cols = np.flatnonzero(hot.any(axis=1)), np.flatnonzero(hot.any(axis=0))
    if rows.size == 0:
        return None
    (y0, y1), (x0, x1) = (_span(rows[0], rows[-1], grid.shape[0], size[1]),
                          _span(cols[0], cols[-1], grid.shape[1], size[0]))
    if (x0, y0, x1, y1) == (0, 0) + size:
        return upsample(grid, size), (0, 0)
    (rows_n, cols_n), (width, height) = grid.shape, size
    box = (x0 * cols_n // width, y0 * rows_n // height, x1 * cols_n // width, y1 * rows_n // height)  # exact
    picture = Image.fromarray(grid, "F").resize((x1 - x0, y1 - y0), Image.Resampling.BILINEAR, box=box)
    return np.asarray(picture), (y0, x0)


def _span(first: int, last: int, cells: int, pixels: int) -> tuple[int, int]:
    """Output pixels [start, stop) whose bilinear support reaches grid cells ``first``..``last`` along one axis,
    widened to whole periods of the grid-to-picture ratio.

    Pixel ``i`` samples at ``c = (i + 0.5) * scale`` and weighs cells ``x`` with ``|x + 0.5 - c| < support``
    (support = max(scale, 1): the triangle filter widens when shrinking); one pixel more each side. Whole
    periods (``pixels / gcd``) put both ends on whole grid cells, which Pillow's box (float32) holds exactly:
    the window's values are then the full upsample's to the last bit or two. Where the sides share no factor
    the period is the whole side, and the window spans it."""
    scale = cells / pixels
    support = max(scale, 1.0)
    start = max(0, int(np.floor((first + 0.5 - support) / scale - 0.5)) - 1)
    stop = min(pixels, int(np.ceil((last + 0.5 + support) / scale - 0.5)) + 2)
    period = pixels // math.gcd(cells, pixels)
    return start // period * period, min(pixels, -(-stop // period) * period)


def _number(out: Image.Image, corners: list[tuple[int, int]]) -> None:
    """Each kept area's rank in a badge at its box's (top, left) corner, above the box where there is room."""
    side = badge_side(out.size)
    for rank, (top, left) in enumerate(corners, start=1):
        y = top - side if top >= side else top
        x = min(max(0, left), max(0, out.width - side))
        out.paste(number_badge(rank, side), (x, min(y, max(0, out.height - side))))


def encode(picture: Image.Image, encoding: str) -> bytes:
    """``jpeg`` via Pillow (libjpeg-turbo), ``png`` via our parallel writer, ``mask`` as 1-bit PNG."""
    if encoding == "png":
        return encode_png(np.asarray(picture.convert("RGB")))
    buffer = io.BytesIO()
    if encoding == "jpeg":
        picture.save(buffer, "JPEG", quality=JPEG_QUALITY)
    elif encoding == "mask":
        picture.convert("1").save(buffer, "PNG", optimize=False)
    else:
        raise ValueError(f"unknown picture encoding {encoding!r}")
    return buffer.getvalue()


def png_overlay(image: Image.Image, heat: torch.Tensor | np.ndarray, *, vmin: float, vmax: float,
                size: tuple[int, int] | None = None) -> bytes:
    """PNG bytes of ``overlay_image`` (kept for callers of the first API)."""
    return encode(overlay_image(image, heat, vmin=vmin, vmax=vmax, size=size), "png")


def jpeg_overlay(image: Image.Image, heat: torch.Tensor | np.ndarray, *, vmin: float, vmax: float,
                 size: tuple[int, int] | None = None) -> bytes:
    """JPEG bytes of ``overlay_image``: ~7x smaller and faster to write than any PNG of a photo."""
    return encode(overlay_image(image, heat, vmin=vmin, vmax=vmax, size=size), "jpeg")


def mask_image(heat: torch.Tensor | np.ndarray, threshold: float, size: tuple[int, int]) -> Image.Image:
    """White where the score exceeds ``threshold`` (the verdict's own rule, per pixel), black elsewhere."""
    above = upsample(heat, size) > threshold
    return Image.fromarray(above.astype(np.uint8) * 255, "L")


@dataclass(frozen=True)
class Components:
    """The connected areas above a threshold on an upsampled map, strongest (highest peak) first.

    One labelling serves the overlay (which tints and numbers only the first few) and the ``regions`` list, so
    the overlay's region 1 is the answer's first region."""

    labels: np.ndarray  # int32 label per pixel of ``window`` (0 = at or below the threshold)
    window: tuple[slice, slice]  # where ``labels`` sits in the full map: the bounding box of all pixels above
    order: np.ndarray  # label ids (1-based), highest peak first (ties: lower label first)
    areas: np.ndarray  # pixels per label id (index 0: the pixels below)
    peaks: np.ndarray  # highest map value per label id
    shape: tuple[int, int]  # (h, w) of the whole map

    @property
    def count(self) -> int:
        return int(self.order.size)

    def mask(self, rank: int) -> np.ndarray:
        """Pixels of the ``rank``-th strongest area (0-based) over the whole map."""
        full = np.zeros(self.shape, dtype=bool)
        full[self.window] = self.labels == self.order[rank]
        return full


def rank_components(big: np.ndarray, threshold: float, *, origin: tuple[int, int] = (0, 0),
                    shape: tuple[int, int] | None = None) -> Components | None:
    """Label the pixels of ``big`` above ``threshold`` (8-connected) and rank the areas by peak; None when none is
    above. Only the bounding box of what is above is labelled: a normal part costs one comparison.

    ``big`` may be a window of a larger map (``hot_window``): ``origin`` is its (top, left) there and ``shape``
    the whole map's (h, w), so ``window`` and ``mask`` are in the whole map's coordinates."""
    above = big > threshold
    hot_rows, hot_cols = np.flatnonzero(above.any(axis=1)), np.flatnonzero(above.any(axis=0))
    if hot_rows.size == 0:
        return None
    local = np.s_[int(hot_rows[0]):int(hot_rows[-1]) + 1, int(hot_cols[0]):int(hot_cols[-1]) + 1]
    labels, count = ndimage.label(above[local], structure=np.ones((3, 3), dtype=bool))
    flat = labels.ravel()
    # bincount / maximum.at: ~6x faster than ndimage.sum_labels / ndimage.maximum on a 900x900 map
    areas = np.bincount(flat, minlength=count + 1)
    peaks = np.full(count + 1, -np.inf, dtype=np.float32)
    labelled = flat > 0  # the pixels below need no peak: ufunc.at costs per element
    np.maximum.at(peaks, flat[labelled], big[local].ravel()[labelled])
    order = np.argsort(-peaks[1:], kind="stable") + 1
    oy, ox = origin
    window = np.s_[oy + local[0].start:oy + local[0].stop, ox + local[1].start:ox + local[1].stop]
    return Components(labels.astype(np.int32, copy=False), window, order, areas, peaks,
                      shape or (big.shape[0], big.shape[1]))


def find_regions(heat: torch.Tensor | np.ndarray, threshold: float, image_size: tuple[int, int],
                 work_size: tuple[int, int]) -> tuple[list[Region], int]:
    """Connected areas above ``threshold`` (8-connected), strongest first, at most ``MAX_REGIONS``; and
    how many there were. Found on the map at ``work_size``, boxes scaled to ``image_size`` (w, h)."""
    big = upsample(heat, work_size)
    comp = rank_components(big, threshold)
    if comp is None:
        return [], 0
    y0, x0 = comp.window[0].start, comp.window[1].start
    slices = ndimage.find_objects(comp.labels)
    sx, sy = image_size[0] / work_size[0], image_size[1] / work_size[1]
    regions = []
    for label in comp.order[:MAX_REGIONS]:
        rows, cols = slices[label - 1]
        box = (int((cols.start + x0) * sx), int((rows.start + y0) * sy),
               min(image_size[0], int(np.ceil((cols.stop + x0) * sx))),
               min(image_size[1], int(np.ceil((rows.stop + y0) * sy))))
        regions.append(Region(box=box, area_pct=float(100.0 * comp.areas[label] / big.size),
                              peak_score=float(comp.peaks[label])))
    return regions, comp.count


def raw_grid(heat: torch.Tensor | np.ndarray) -> tuple[bytes, list[int]]:
    """Little-endian float16 bytes of the model-resolution map, and its [height, width]."""
    array = heat.detach().cpu().numpy() if isinstance(heat, torch.Tensor) else np.asarray(heat)
    grid = np.ascontiguousarray(array.astype("<f2"))
    return grid.tobytes(), list(grid.shape)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@dataclass(frozen=True)
class Rendered:
    """What one predict answer carries for its heatmap mode (no pydantic here: the service layer wraps it)."""

    encoding: str | None = None  # jpeg, png, mask, raw; None for `regions` and `none`
    data: bytes = b""
    shape: tuple[int, int] | None = None  # [height, width] of the picture or of the raw grid
    vmin: float | None = None
    vmax: float | None = None
    regions: list[Region] | None = None
    regions_total: int | None = None
    picture: Image.Image | None = None  # the overlay before encoding (jpeg / png), for the record's thumbnail


def render(image: Image.Image, heat: torch.Tensor | np.ndarray, threshold: float | None, mode: str,
           heatmap_size: int | None = None, max_side: int = DEFAULT_MAX_SIDE) -> Rendered:
    """The output of one heatmap ``mode`` for one image (runs in the threadpool, per request)."""
    if mode == "none":
        return Rendered()
    if mode == "raw":
        data, grid = raw_grid(heat)
        return Rendered("raw", data, (grid[0], grid[1]))
    vmin, vmax = colour_scale(threshold)
    size = output_size(image.size, heatmap_size, max_side)
    shape = (size[1], size[0])
    if mode in ("jpeg", "png"):
        overlay = overlay_image(image, heat, vmin=vmin, vmax=vmax, size=size)
        return Rendered(mode, encode(overlay, mode), shape, vmin, vmax, picture=overlay)
    regions, total = find_regions(heat, vmin, image.size, size)
    if mode == "regions":
        return Rendered(regions=regions, regions_total=total, vmin=vmin)
    if mode == "mask":
        return Rendered("mask", encode(mask_image(heat, vmin, size), "mask"), shape, vmin, None, regions, total)
    raise ValueError(f"unknown heatmap mode {mode!r}")
