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
    list and show every one). Only the bounding box of the kept areas is touched, so a normal part (the common
    case on a line) costs a resize and one comparison.
    """
    if not vmax > vmin:
        raise ValueError(f"colour scale needs vmax > vmin, got [{vmin}, {vmax}]")
    size = size or image.size
    big = upsample(heat, size)
    out = image.convert("RGB")
    out = out.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0) if out.size != size else out.copy()
    comp = rank_components(big, vmin)
    if comp is None:
        return out
    kept = comp.order[:regions]
    above = np.zeros(big.shape, dtype=bool)
    above[comp.window] = np.isin(comp.labels, kept)
    rows, cols = np.flatnonzero(above.any(axis=1)), np.flatnonzero(above.any(axis=0))
    width = max(1, round(max(size) / 400))  # contour: ~2 px on a 900 px picture, visible at any size
    y0, y1 = max(0, rows[0] - width - 1), min(size[1], rows[-1] + width + 2)
    x0, x1 = max(0, cols[0] - width - 1), min(size[0], cols[-1] + width + 2)
    crop, hot = big[y0:y1, x0:x1], above[y0:y1, x0:x1]
    crop_size = (x1 - x0, y1 - y0)
    level = np.clip((crop - vmin) * (1.0 / (vmax - vmin)), 0.0, 1.0)
    index = Image.frombytes("P", crop_size, (level * 255.0 + 0.5).astype(np.uint8).tobytes())
    index.putpalette(_PALETTE.tobytes())
    alpha = np.where(hot, (ALPHA_MIN + (ALPHA_MAX - ALPHA_MIN) * level) * 255.0 + 0.5, 0.0).astype(np.uint8)
    box = (x0, y0, x1, y1)
    tinted = np.array(Image.composite(index.convert("RGB"), out.crop(box), Image.frombytes("L", crop_size,
                                                                                           alpha.tobytes())))
    edge = hot & ~ndimage.binary_erosion(hot, iterations=width, border_value=1)
    tinted[edge] = CONTOUR_RGB
    out.paste(Image.fromarray(tinted), box)
    _number(out, comp, kept)
    return out


def _number(out: Image.Image, comp: Components, kept: np.ndarray) -> None:
    """Each kept area's rank in a badge at its box's top-left corner, above the box where there is room."""
    side = badge_side(out.size)
    slices = ndimage.find_objects(comp.labels)
    wy, wx = comp.window[0].start, comp.window[1].start
    for rank, label in enumerate(kept, start=1):
        rows, cols = slices[label - 1]
        top, left = rows.start + wy, cols.start + wx
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


def rank_components(big: np.ndarray, threshold: float) -> Components | None:
    """Label the pixels of ``big`` above ``threshold`` (8-connected) and rank the areas by peak; None when none is
    above. Only the bounding box of what is above is labelled: a normal part costs one comparison."""
    above = big > threshold
    hot_rows, hot_cols = np.flatnonzero(above.any(axis=1)), np.flatnonzero(above.any(axis=0))
    if hot_rows.size == 0:
        return None
    window = np.s_[int(hot_rows[0]):int(hot_rows[-1]) + 1, int(hot_cols[0]):int(hot_cols[-1]) + 1]
    labels, count = ndimage.label(above[window], structure=np.ones((3, 3), dtype=bool))
    flat = labels.ravel()
    # bincount / maximum.at: ~6x faster than ndimage.sum_labels / ndimage.maximum on a 900x900 map
    areas = np.bincount(flat, minlength=count + 1)
    peaks = np.full(count + 1, -np.inf, dtype=np.float32)
    np.maximum.at(peaks, flat, big[window].ravel())
    order = np.argsort(-peaks[1:], kind="stable") + 1
    return Components(labels.astype(np.int32, copy=False), window, order, areas, peaks,
                      (big.shape[0], big.shape[1]))


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
