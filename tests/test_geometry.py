"""Camera geometry: the pixels each view holds and the exact way its map lands back on the upload.

The round trips use the image itself as the "map": a bright rectangle rendered into the views and mapped
back must have its edges where they are in the upload, to a fraction of a pixel, for every resize mode,
with an ROI and with overlapping tiles. A placement off by one pixel fails them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from clipshot.backbone.base import unit_pixels
from clipshot.geometry import (
    MAX_TILES,
    Geometry,
    GeometryError,
    build_geometry,
    native_frame,
    tiling,
)

WIDTH, HEIGHT = 301, 137  # odd, non-square: no resize factor is a whole number
BOX = (117, 41, 181, 97)  # left, top, right (exclusive), bottom (exclusive) of the planted bright square
# Edge crossings of the mapped-back rectangle must sit within this many upload pixels of the true edge.
# Measured error of the correct mapping at 256 px frames is <= 0.06 px (resampling blur); a placement off
# by one upload pixel shows up as >= 0.75 px, so 0.25 separates the two with margin on both sides.
TOLERANCE_PX = 0.25


def planted() -> Image.Image:
    arr = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    left, top, right, bottom = BOX
    arr[top:bottom, left:right] = 255
    return Image.fromarray(arr)


def crossings(profile: np.ndarray) -> tuple[float, float]:
    """Sub-pixel positions (index units: pixel i's centre is i) of the first rise and last fall through 0.5."""
    i = int(np.where((profile[:-1] < 0.5) & (profile[1:] >= 0.5))[0][0])
    j = int(np.where((profile[:-1] >= 0.5) & (profile[1:] < 0.5))[0][-1])
    return (i + (0.5 - profile[i]) / (profile[i + 1] - profile[i]),
            j + (profile[j] - 0.5) / (profile[j] - profile[j + 1]))


def edge_errors(geometry: Geometry, size: int = 256, out_size: tuple[int, int] | None = None) -> np.ndarray:
    """Render -> use the red channel of every view as its map -> map back -> distance of each edge."""
    image = planted()
    views = geometry.unit_pixels([image], size)[:, 0]
    heat = views.reshape(-1, views.shape[-1])  # views stacked vertically, as the detector stacks maps
    amap = geometry.map_back(heat, image.size, size, out_size)
    oh, ow = amap.shape
    sx, sy = ow / WIDTH, oh / HEIGHT
    left, top, right, bottom = BOX
    row = amap[int((top + bottom) / 2 * sy)]
    col = amap[:, int((left + right) / 2 * sx)]
    # an edge at upload coordinate e lies at e * s - 0.5 in output index units
    found = [*crossings(row), *crossings(col)]
    want = [left * sx - 0.5, right * sx - 0.5, top * sy - 0.5, bottom * sy - 0.5]
    return np.abs(np.array(found) - np.array(want))


GEOMETRIES = {
    "squash": Geometry(),
    "letterbox": Geometry(resize="letterbox"),
    "native": Geometry(resize="native", frame=native_frame(WIDTH / HEIGHT, 256, 16)),
    "roi": Geometry(roi=(50, 20, 290, 130)),
    "roi-letterbox": Geometry(resize="letterbox", roi=(50, 20, 290, 130)),
    "tiles": Geometry(tiles=(1, 3), tile_size=(1.0, HEIGHT / WIDTH)),
    "roi-tiles": Geometry(roi=(30, 10, 280, 130), tiles=(2, 3), tile_size=(0.7, 0.4)),
}


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_planted_square_maps_back_to_its_upload_position(name):
    assert edge_errors(GEOMETRIES[name]).max() < TOLERANCE_PX


@pytest.mark.parametrize("name", ["native", "roi-tiles"])
def test_mapping_back_at_another_output_size(name):
    """A requested map size (the eval's 256 masks, the service's overlay grid) keeps the placement too."""
    assert edge_errors(GEOMETRIES[name], out_size=(2 * HEIGHT, 2 * WIDTH)).max() < 2 * TOLERANCE_PX


def test_a_one_pixel_roi_shift_is_caught():
    """The bar above is not loose: pretending the ROI starts one pixel later breaks it."""
    good = GEOMETRIES["roi"]
    image = planted()
    views = good.unit_pixels([image], 256)[:, 0]
    shifted = Geometry(roi=(51, 20, 291, 130))  # the views were cut from (50, 20, ...)
    amap = shifted.map_back(views.reshape(-1, views.shape[-1]), image.size, 256)
    row = amap[(BOX[1] + BOX[3]) // 2]
    assert abs(crossings(row)[0] - (BOX[0] - 0.5)) > 3 * TOLERANCE_PX


def test_outside_the_roi_is_zero_and_inside_is_covered():
    geometry = Geometry(roi=(50, 20, 290, 130))
    heat = torch.ones(256, 256)
    amap = geometry.map_back(heat, (WIDTH, HEIGHT), 256)
    assert amap.shape == (HEIGHT, WIDTH)
    assert np.allclose(amap[20:130, 50:290], 1.0)
    assert amap[:20].max() == 0.0 and amap[:, 290:].max() == 0.0 and amap[:, :50].max() == 0.0


def test_tiles_cover_the_region_and_overlaps_are_averaged():
    geometry = Geometry(tiles=(1, 3), tile_size=(1.0, 0.5))
    views = geometry.views((200, 100), 64)
    assert [v.source for v in views] == [(0, 0, 100, 100), (50, 0, 150, 100), (100, 0, 200, 100)]
    heat = torch.cat([torch.full((64, 64), float(i)) for i in (1, 2, 3)])  # tile i has value i
    amap = geometry.map_back(heat, (200, 100), 64)
    assert np.allclose([amap[50, 10], amap[50, 75], amap[50, 125], amap[50, 190]], [1.0, 1.5, 2.5, 3.0])


def test_plain_squash_renders_exactly_the_historical_pixels():
    """Bundles made before geometry existed keep scoring the same pixels."""
    image = planted()
    assert torch.equal(Geometry().unit_pixels([image], 64), unit_pixels([image], 64))


def test_letterbox_keeps_aspect_and_pads():
    pixels = Geometry(resize="letterbox").unit_pixels([planted()], 64)
    assert pixels.shape == (1, 3, 64, 64)
    content_rows = round(64 * HEIGHT / WIDTH)  # 29 rows of image, the rest padding
    pad = (64 - content_rows) // 2
    assert torch.allclose(pixels[0, :, 0], torch.full((3, 64), 114 / 255))
    assert not torch.allclose(pixels[0, 0, pad + content_rows // 2], torch.full((64,), 114 / 255))


# -- the auto rule and explicit choices ------------------------------------------------------------------
def test_auto_rule_follows_the_images():
    square = build_geometry([(900, 900)] * 4, size=320, multiple=16)
    assert (square.resize, square.frame, square.tiles) == ("squash", (320, 320), None)
    wide = build_geometry([(1130, 460)] * 4, size=320, multiple=16)
    assert wide.resize == "native" and wide.tiles is None
    h, w = wide.frame
    assert h % 16 == 0 and w % 16 == 0 and abs(w / h - 1130 / 460) < 0.25  # multiples of 16 cost some aspect
    big = build_geometry([(2448, 2048)] * 4, size=320, multiple=16)
    assert big.resize == "squash" and big.tiles is not None and big.frame == (320, 320)
    assert big.tiles[0] * big.tiles[1] <= MAX_TILES
    assert big.tile_size[1] * 2448 >= 320  # tiles are never upsampled past the model input here
    assert "aspect" in wide.rule and "tiles" in big.rule


def test_explicit_choices_override_the_rule():
    g = build_geometry([(1130, 460)] * 2, size=320, multiple=16, resize="squash", tile=0, roi=(10, 10, 1110, 450))
    assert (g.resize, g.tiles, g.roi) == ("squash", None, (10, 10, 1110, 450))
    g = build_geometry([(1130, 460)] * 2, size=320, multiple=16, tile=460)
    assert g.tiles == (1, 3) and g.frame == (320, 320)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"roi": (0, 0, 1200, 400)}, "outside"),
    ({"roi": (100, 50, 100, 300)}, "empty"),
    ({"roi": (-5, 0, 100, 100)}, "negative"),
    ({"tile": 500}, "does not fit"),
    ({"tile": 8}, "at least"),
    ({"tile": 300, "tile_overlap": 1.0}, "tile_overlap"),
    ({"resize": "stretch"}, "resize"),
])
def test_bad_geometry_is_refused_with_a_reason(kwargs, message):
    with pytest.raises(GeometryError, match=message):
        build_geometry([(1130, 460), (1000, 460)], size=320, multiple=16, **kwargs)


def test_roi_is_checked_against_every_shot():
    with pytest.raises(GeometryError, match="outside the 800x460"):
        build_geometry([(1130, 460), (800, 460)], size=320, multiple=16, roi=(0, 0, 1000, 400))


def test_tiling_counts():
    assert tiling((1130, 460), 460, 0.25) == ((1, 3), (1.0, 460 / 1130))
    assert tiling((640, 640), 320, 0.0) == ((2, 2), (0.5, 0.5))


def test_geometry_survives_the_manifest_round_trip():
    g = build_geometry([(2448, 2048)], size=320, multiple=16, roi=(8, 8, 2440, 2040))
    assert Geometry.from_dict(g.to_dict()) == g
    assert Geometry.from_dict(None) == Geometry()  # bundles from before geometry: the plain squash
