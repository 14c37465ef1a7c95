"""Camera geometry: which pixels of an upload the model sees, and how its maps land back on the upload.

Industrial frames are rarely square and defects can be a few pixels wide, so one squash to S x S is not
enough. A category's ``Geometry`` (stored in its bundle, so registration, calibration, training and
prediction all see the same pixels) says:

* ``roi``: a rectangle in original image coordinates (left, top, right, bottom; right/bottom exclusive);
  everything outside it is ignored and gets heat 0;
* ``tiles``: an optional rows x cols grid of overlapping tiles over the ROI, each tile a fixed fraction of
  the ROI, each fed to the model at full model resolution; the image score is taken over all tiles;
* ``resize``: how each view (the ROI, or each tile) is fitted into the model ``frame`` (height, width):
  ``squash`` (stretch), ``letterbox`` (keep aspect, pad) or ``native`` (keep aspect in a non-square frame
  whose aspect was chosen from the shots, so there is little or no padding).

The mapping back samples each view's model-resolution map at the exact sub-pixel position every output
pixel centre came from (``grid_sample``, the same pixel-centre convention as the forward resize), so a
defect lands where it is in the upload, at any output size.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

RESIZE_MODES = ("squash", "letterbox", "native")
# Box-reduce by an integer factor first when the image is over 1.5x the target, then bicubic: ~2.5x faster
# than bicubic from full size on 900 px uploads, and within 0.2 grey levels of it on average.
REDUCING_GAP = 1.5
PAD = (114, 114, 114)  # letterbox padding (mid grey); shots are padded alike, so the memory knows it
# Auto rule (see ``auto_geometry``): a view is resized by its short side's factor at most TILE_ABOVE before
# tiles are used; tiles then aim at TILE_TARGET (the factor at which MVTec bottle, 900 -> 320 px, works).
ASPECT_LIMIT = 1.5
TILE_ABOVE = 4.0
TILE_TARGET = 2.5
TILE_OVERLAP = 0.25
MAX_TILES = 16
MIN_TILE_PX = 16
# What any geometry may ask of the model, checked when it is planned (``check_usable``), before a registration
# stores anything. Every view is one full backbone pass per prediction and per fitted image, so the views per
# image stop where the auto rule stops (explicit tiles of 16 px at 0.89 overlap planned 254,016 per image, and
# 25 views of 300 px made one registration take 12 minutes).
MAX_VIEWS = MAX_TILES
# Shortest side of a view's source region (image, ROI or tile): below it the model sees an upsampled blur
# (a 1x1 shot is one colour) and the fit's light-view zooms and feature maps of it are empty.
MIN_REGION_PX = MIN_TILE_PX
# Longest over shortest side of a view's source region. The native frame keeps ~size x size pixels, so its
# short side shrinks as sqrt(aspect): at 16:1 a 320-px model still gets an 80 x 1280 frame (5 feature rows
# of 16 px), while a 1 x 39,000,000 PNG asked for a 1,998,400 x 32 frame (8 GB). Longer strips need an ROI.
MAX_ASPECT = 16.0
# Model frame area in units of the backbone's square input (size x size): the native frame's rounding to
# feature-cell multiples stays well under this; only a degenerate aspect would pass it.
MAX_FRAME_AREA = 2.0


class GeometryError(ValueError):
    """Geometry that cannot apply to an image (ROI outside it, empty, tiles that do not fit)."""


Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class View:
    """One model input cut from an image: ``source`` box in image pixels -> ``content`` box in the frame."""

    source: Box
    content: tuple[int, int, int, int]


@dataclass(frozen=True)
class Geometry:
    """Per-category preprocessing; ``frame`` None means the backbone's square ``image_size``."""

    resize: str = "squash"
    frame: tuple[int, int] | None = None  # (height, width) of the model input
    roi: tuple[float, float, float, float] | None = None  # (left, top, right, bottom) in original pixels
    tiles: tuple[int, int] | None = None  # (rows, cols)
    tile_size: tuple[float, float] | None = None  # tile (height, width) as fractions of the ROI
    rule: str = field(default="", compare=False)  # how it was chosen, for people reading the manifest

    def __post_init__(self) -> None:
        if self.resize not in RESIZE_MODES:
            raise GeometryError(f"resize must be one of {', '.join(RESIZE_MODES)}, got {self.resize!r}")
        if self.frame is not None and (len(self.frame) != 2 or min(self.frame) < 1):
            raise GeometryError(f"frame must be (height, width) >= 1, got {self.frame}")
        if self.roi is not None:
            left, top, right, bottom = self.roi
            if left < 0 or top < 0 or right <= left or bottom <= top:
                raise GeometryError(f"ROI {list(self.roi)} is empty or negative: need 0 <= left < right and "
                                    "0 <= top < bottom (right/bottom exclusive)")
        if (self.tiles is None) != (self.tile_size is None):
            raise GeometryError("tiles and tile_size go together")
        if self.tiles is not None and self.tile_size is not None and (
                min(self.tiles) < 1 or not all(0 < f <= 1 for f in self.tile_size)):
            raise GeometryError(f"tiles must be >= 1 and tile fractions in (0, 1], got {self.tiles} {self.tile_size}")

    # -- (de)serialisation for the bundle manifest ----------------------------------------------
    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict | None) -> Geometry:
        """Old bundles have no geometry: they were made with the plain squash."""
        data = dict(data or {})
        for key in ("frame", "roi", "tiles", "tile_size"):
            if data.get(key) is not None:
                data[key] = tuple(data[key])
        return cls(**data)

    @property
    def views_per_image(self) -> int:
        return 1 if self.tiles is None else self.tiles[0] * self.tiles[1]

    @property
    def is_plain(self) -> bool:
        """The historical squash of the whole image: its map needs no placement."""
        return self.resize == "squash" and self.roi is None and self.tiles is None

    def frame_of(self, default_size: int) -> tuple[int, int]:
        return self.frame if self.frame is not None else (default_size, default_size)

    # -- forward: image -> views ------------------------------------------------------------------
    def region(self, image_size: tuple[int, int]) -> Box:
        """The ROI (or the whole image) for an image of ``image_size`` = (width, height)."""
        width, height = image_size
        if self.roi is None:
            return (0.0, 0.0, float(width), float(height))
        left, top, right, bottom = self.roi
        if right > width or bottom > height:
            raise GeometryError(f"ROI {list(self.roi)} lies outside the {width}x{height} image")
        return (float(left), float(top), float(right), float(bottom))

    def views(self, image_size: tuple[int, int], default_size: int) -> list[View]:
        """Every view of an image, in the order their pixels and maps are stacked."""
        x0, y0, x1, y1 = self.region(image_size)
        if self.tiles is None or self.tile_size is None:  # set together (checked on construction)
            boxes = [(x0, y0, x1, y1)]
        else:
            rows, cols = self.tiles
            th, tw = self.tile_size[0] * (y1 - y0), self.tile_size[1] * (x1 - x0)
            if th < 1 or tw < 1:
                raise GeometryError(f"tiles of {tw:.1f}x{th:.1f} px are empty in the {x1 - x0:.0f}x{y1 - y0:.0f} "
                                    "region; use fewer tiles or a larger ROI")
            ys = _starts(y0, y1 - y0, th, rows)
            xs = _starts(x0, x1 - x0, tw, cols)
            boxes = [(x, y, x + tw, y + th) for y in ys for x in xs]
        frame = self.frame_of(default_size)
        return [View(box, self._content(box, frame)) for box in boxes]

    def _content(self, box: Box, frame: tuple[int, int]) -> tuple[int, int, int, int]:
        fh, fw = frame
        if self.resize == "squash":
            return (0, 0, fw, fh)
        sw, sh = box[2] - box[0], box[3] - box[1]
        scale = min(fw / sw, fh / sh)
        cw, ch = min(fw, max(1, round(sw * scale))), min(fh, max(1, round(sh * scale)))
        ox, oy = (fw - cw) // 2, (fh - ch) // 2
        return (ox, oy, ox + cw, oy + ch)

    def render(self, image: Image.Image, default_size: int) -> list[np.ndarray]:
        """(H, W, 3) uint8 arrays of every view: the pixels the model sees (before normalisation)."""
        rgb = image.convert("RGB")
        fh, fw = self.frame_of(default_size)
        out = []
        for view in self.views(rgb.size, default_size):
            cx0, cy0, cx1, cy1 = view.content
            part = rgb.resize((cx1 - cx0, cy1 - cy0), Image.Resampling.BICUBIC, box=view.source,
                              reducing_gap=REDUCING_GAP)
            if (cx1 - cx0, cy1 - cy0) != (fw, fh):
                canvas = Image.new("RGB", (fw, fh), PAD)
                canvas.paste(part, (cx0, cy0))
                part = canvas
            out.append(np.asarray(part))
        return out

    def working_factor(self, sizes: Sequence[tuple[int, int]], default_size: int) -> int:
        """Largest integer factor images of ``sizes`` may be box-reduced by before ``render`` (1: none).

        Why: a fit holds all of a category's images at once, and a 40 MP shot rendered to one 320-px view
        needs a tenth of its pixels. ``render`` already box-reduces each view while its source is over
        REDUCING_GAP x its frame size, so reducing first by no more than that keeps every view's source at
        least REDUCING_GAP x (and MIN_REGION_PX) in size and its pixels within rounding of the full decode."""
        factor = None
        for size in sizes:
            for view in self.views(size, default_size):
                sw, sh = view.source[2] - view.source[0], view.source[3] - view.source[1]
                cw, ch = view.content[2] - view.content[0], view.content[3] - view.content[1]
                fit = min(sw / cw, sh / ch) / REDUCING_GAP
                factor = min(fit if factor is None else factor, fit, min(sw, sh) / MIN_REGION_PX)
        return max(1, int(factor or 1))

    def scaled(self, factor: int) -> Geometry:
        """The same views for images box-reduced by ``factor`` (the ROI in reduced pixels; tiles are fractions)."""
        if factor == 1 or self.roi is None:
            return self
        left, top, right, bottom = self.roi
        return replace(self, roi=(left / factor, top / factor, right / factor, bottom / factor))

    def unit_pixels(self, images: Sequence[Image.Image], default_size: int) -> torch.Tensor:
        """(N * views, 3, H, W) float32 in [0, 1], each image's views consecutive."""
        return self.unit_bytes(images, default_size).float().div_(255.0)

    def unit_bytes(self, images: Sequence[Image.Image], default_size: int) -> torch.Tensor:
        """``unit_pixels`` before the scaling: uint8, a quarter of the bytes (what crosses to an accelerator)."""
        arrays = [view for img in images for view in self.render(img, default_size)]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)

    # -- backward: maps -> image coordinates ---------------------------------------------------------
    def map_back(self, heat: torch.Tensor, image_size: tuple[int, int], default_size: int,
                 out_size: tuple[int, int] | None = None) -> np.ndarray:
        """Stacked view maps (views * H, W) at frame resolution -> float32 (h, w) map over the whole image.

        ``out_size`` = (h, w), default the image's own size. Overlapping tiles are averaged; pixels
        outside the ROI get 0 (not inspected)."""
        width, height = image_size
        oh, ow = (height, width) if out_size is None else out_size
        fh, fw = self.frame_of(default_size)
        views = self.views(image_size, default_size)
        maps = heat.detach().float().cpu().reshape(len(views), fh, fw)
        sx, sy = ow / width, oh / height
        total = torch.zeros(oh, ow)
        weight = torch.zeros(oh, ow)
        for view, grid_map in zip(views, maps, strict=True):
            bx0, by0, bx1, by1 = view.source
            cols = _covered(bx0 * sx, bx1 * sx, ow)
            rows = _covered(by0 * sy, by1 * sy, oh)
            if cols.numel() == 0 or rows.numel() == 0:
                continue
            cx0, cy0, cx1, cy1 = view.content
            # output pixel centre -> position inside the source box -> continuous frame coordinate -> [-1, 1]
            u = ((cols + 0.5) / sx - bx0) / (bx1 - bx0)
            v = ((rows + 0.5) / sy - by0) / (by1 - by0)
            gx = 2 * (cx0 + u * (cx1 - cx0)) / fw - 1
            gy = 2 * (cy0 + v * (cy1 - cy0)) / fh - 1
            grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], dim=-1)[None]
            sampled = F.grid_sample(grid_map[None, None], grid, mode="bilinear", padding_mode="border",
                                    align_corners=False)[0, 0]
            r0, c0 = int(rows[0]), int(cols[0])
            total[r0 : r0 + rows.numel(), c0 : c0 + cols.numel()] += sampled
            weight[r0 : r0 + rows.numel(), c0 : c0 + cols.numel()] += 1
        return torch.where(weight > 0, total / weight.clamp_min(1), torch.zeros(())).numpy()

    def image_grid(self, heat: torch.Tensor, image_size: tuple[int, int], default_size: int) -> np.ndarray:
        """The map over the whole image at about model resolution (for overlays and the raw grid).

        The plain squash keeps its frame grid (it already covers the image); any other geometry is mapped
        back at the image's aspect, its longer side at most the model's resolution times the tile count."""
        if self.is_plain:
            return heat.detach().float().cpu().numpy()
        width, height = image_size
        fh, fw = self.frame_of(default_size)
        rows, cols = self.tiles or (1, 1)
        scale = min(1.0, max(fh * rows, fw * cols) / max(width, height))
        out = (max(1, round(height * scale)), max(1, round(width * scale)))
        return self.map_back(heat, image_size, default_size, out)


def _starts(origin: float, length: float, tile: float, count: int) -> list[float]:
    """Evenly spread tile starts; the first tile touches the region's start, the last its end."""
    if tile > length + 1e-6:
        raise GeometryError(f"a tile of {tile:.0f} px does not fit in {length:.0f} px")
    if count == 1:
        return [origin + (length - tile) / 2]
    return [origin + (length - tile) * i / (count - 1) for i in range(count)]


def _covered(start: float, end: float, limit: int) -> torch.Tensor:
    """Indices of output pixels whose centres lie in [start, end)."""
    first = max(0, math.ceil(start - 0.5))
    last = min(limit, math.ceil(end - 0.5))
    return torch.arange(first, last, dtype=torch.float32)


# -- building a geometry: explicit request or the automatic rule -----------------------------------------
def native_frame(aspect: float, size: int, multiple: int) -> tuple[int, int]:
    """(height, width) with width/height ~ ``aspect``, about size x size pixels, sides multiples of ``multiple``."""
    height = max(multiple, round(size / math.sqrt(aspect) / multiple) * multiple)
    width = max(multiple, round(size * math.sqrt(aspect) / multiple) * multiple)
    return height, width


def tiling(region: tuple[float, float], tile: float, overlap: float) -> tuple[tuple[int, int], tuple[float, float]]:
    """(rows, cols) and tile fractions for square ``tile``-px tiles over a (width, height) region."""
    width, height = region
    if tile < MIN_TILE_PX:
        raise GeometryError(f"tile must be at least {MIN_TILE_PX} px, got {tile:g}")
    if not 0 <= overlap < 1:
        raise GeometryError(f"tile_overlap must be in [0, 1), got {overlap:g}")
    if tile > min(width, height):
        raise GeometryError(f"a {tile:g} px tile does not fit in the {width:g}x{height:g} px region "
                            "(ROI or image); use a smaller tile")
    stride = tile * (1 - overlap)
    cols = 1 + max(0, math.ceil((width - tile) / stride - 1e-9))
    rows = 1 + max(0, math.ceil((height - tile) / stride - 1e-9))
    return (rows, cols), (tile / height, tile / width)


def build_geometry(sizes: Sequence[tuple[int, int]], *, size: int, multiple: int, resize: str | None = None,
                   roi: tuple[int, int, int, int] | None = None, tile: int | None = None,
                   tile_overlap: float = TILE_OVERLAP) -> Geometry:
    """Geometry for shots of ``sizes`` (width, height): explicit choices win, the rest follows the auto rule.

    ``resize`` None = auto; ``tile`` None = auto, 0 = no tiles. Validates everything against every shot, so
    a registration that would fail later fails here, before anything is stored."""
    if not sizes:
        raise GeometryError("geometry needs at least one shot")
    if resize is not None and resize not in RESIZE_MODES:
        raise GeometryError(f"resize must be one of auto, {', '.join(RESIZE_MODES)}; got {resize!r}")
    probe = Geometry(roi=roi)
    regions = [probe.region(s) for s in sizes]  # ROI inside every shot
    widths = [r[2] - r[0] for r in regions]
    heights = [r[3] - r[1] for r in regions]
    width, height = statistics.median(widths), statistics.median(heights)
    aspect = width / height
    notes = []
    if resize is None:
        far = max(aspect, 1 / aspect) >= ASPECT_LIMIT
        resize = "native" if far else "squash"
        notes.append(f"aspect {aspect:.2f} {'>=' if far else '<'} {ASPECT_LIMIT} (or its inverse) -> {resize}")
    frame = native_frame(aspect, size, multiple) if resize == "native" else (size, size)
    tiles = tile_size = None
    auto_tiles = tile is None
    if tile is None:
        factor = min(height / frame[0], width / frame[1])
        if factor > TILE_ABOVE:
            tile = _auto_tile(width, height, size, tile_overlap)
            notes.append(f"downscale {factor:.1f} > {TILE_ABOVE} -> {tile} px tiles")
        else:
            notes.append(f"downscale {factor:.1f} <= {TILE_ABOVE} -> no tiles")
    if tile and auto_tiles and _views(width, height, tile, tile_overlap) > MAX_VIEWS:
        notes[-1] += f", but over {MAX_VIEWS} of them even at the largest size (a long strip) -> no tiles"
        tile = None
    if tile:
        if resize == "native":
            frame = (size, size)  # tiles are square: a square frame fits them without padding
        smallest = (min(widths), min(heights))
        tiling(smallest, tile, tile_overlap)  # the tile must fit in every shot's region
        tiles, tile_size = tiling((width, height), tile, tile_overlap)
    if tile_size is not None:
        for w, h in zip(widths, heights, strict=True):
            if tile_size[1] * w < MIN_TILE_PX or tile_size[0] * h < MIN_TILE_PX:
                raise GeometryError(f"the tiles would be under {MIN_TILE_PX} px on a {w:g}x{h:g} px shot region")
    geometry = Geometry(resize=resize, frame=frame, roi=roi, tiles=tiles, tile_size=tile_size,
                        rule="auto: " + "; ".join(notes) if notes else "explicit")
    check_usable(geometry, sizes, size)
    return geometry


def check_usable(geometry: Geometry, sizes: Sequence[tuple[int, int]], default_size: int) -> None:
    """Refuse a geometry the model cannot use on shots of ``sizes`` (width, height): too many views, a frame
    far larger than the model input, or a view region too small or too elongated (see the limits above).

    Cheap: counts are checked before any view is listed, so a degenerate request costs no memory."""
    if geometry.views_per_image > MAX_VIEWS:
        rows, cols = geometry.tiles or (1, 1)
        raise GeometryError(f"{rows}x{cols} = {rows * cols} tiles per image; at most {MAX_VIEWS} (each tile is a "
                            "full model pass per prediction): use larger tiles, less overlap or an ROI")
    what = "tile" if geometry.tiles is not None else "ROI" if geometry.roi is not None else "shot"
    for width, height in sizes:
        for view in geometry.views((width, height), default_size):
            w, h = view.source[2] - view.source[0], view.source[3] - view.source[1]
            where = "" if what == "shot" else f" of a {width}x{height} image"
            if min(w, h) < MIN_REGION_PX:
                raise GeometryError(f"a {w:.0f}x{h:.0f} px {what}{where} is too small: the model needs at least "
                                    f"{MIN_REGION_PX} px on each side")
            if max(w, h) > MAX_ASPECT * min(w, h):
                raise GeometryError(f"a {w:.0f}x{h:.0f} px {what}{where} is too elongated: at most "
                                    f"{MAX_ASPECT:g}:1 per view; set an ROI on the part")
    fh, fw = geometry.frame_of(default_size)
    if fh * fw > MAX_FRAME_AREA * default_size * default_size:
        raise GeometryError(f"the model frame {fw}x{fh} px is over {MAX_FRAME_AREA:g}x the {default_size}x"
                            f"{default_size} model input")


def _views(width: float, height: float, tile: float, overlap: float) -> int:
    (rows, cols), _ = tiling((width, height), tile, overlap)
    return rows * cols


def _auto_tile(width: float, height: float, size: int, overlap: float) -> int:
    """Tile side for TILE_TARGET downscale, grown until the grid has at most MAX_TILES tiles."""
    tile = min(width, height, TILE_TARGET * size)
    while True:
        (rows, cols), _ = tiling((width, height), tile, overlap)
        if rows * cols <= MAX_TILES or tile >= min(width, height):
            return int(tile)
        tile = min(min(width, height), tile * 1.25)
