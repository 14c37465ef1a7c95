"""Geometry the model cannot use is refused with 400 before anything is stored; anything unexpected is JSON.

The reproductions are the audit's: explicit tiles that plan hundreds of thousands of views per image, a tile
grid that made registration take 12 minutes, a 1 x 39,000,000 PNG (76 KB on the wire) that asked for a
1,998,400 x 32 model frame, and 1x1 / 20000x2 shots that ended in ``text/plain`` 500s with an empty category
folder left behind.
"""

from __future__ import annotations

import io
import logging
import struct
import zlib

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.api.request_id import HEADER
from app.main import create_app
from clipshot.geometry import MAX_VIEWS, Geometry, GeometryError, build_geometry, check_usable
from tests.helpers.categories import ADMIN, make_settings, snapshot
from tests.helpers.geometry import wide_png


def flat_png(width: int, height: int) -> bytes:
    """A one-colour PNG built from compressed rows, so a 39-megapixel strip costs the test ~1 s and ~80 KB."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    deflate, row = zlib.compressobj(9), b"\0" + b"\x80" * (3 * width)
    rows_per_block = max(1, (1 << 22) // len(row))
    block, parts, left = row * rows_per_block, [], height
    while left:
        take = min(left, rows_per_block)
        parts.append(deflate.compress(block if take == rows_per_block else row * take))
        left -= take
    idat = b"".join(parts) + deflate.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def textured_png(width: int, height: int, seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.frombytes("RGB", (width, height), bytes((seed * 7 + i) % 251 for i in range(width * height * 3))) \
        .save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture()
def client(tmp_path, tiny_backbone):
    with TestClient(create_app(make_settings(tmp_path / "store"), backbone=tiny_backbone),
                    raise_server_exceptions=False) as c:
        yield c


@pytest.mark.parametrize(("size", "data", "message"), [
    ((400, 300), {"tile": "16", "tile_overlap": "0.89"}, f"tiles per image; at most {MAX_VIEWS}"),
    ((1200, 900), {"tile": "300", "tile_overlap": "0.5"}, f"5x7 = 35 tiles per image; at most {MAX_VIEWS}"),
    ((1, 39_000_000), {}, "a 1x39000000 px shot is too small"),
    ((1, 1), {}, "a 1x1 px shot is too small"),
    ((20000, 2), {}, "a 20000x2 px shot is too small"),
    ((2000, 40), {"resize": "native"}, "a 2000x40 px shot is too elongated"),
    ((400, 300), {"roi": "0,0,10,300"}, "a 10x300 px ROI of a 400x300 image is too small"),
])
def test_unusable_geometry_is_a_400_before_anything_is_stored(client, tmp_path, size, data, message):
    store = tmp_path / "store"
    before = snapshot(store)
    shot = flat_png(*size) if size[0] * size[1] > 1_000_000 else textured_png(*size)
    r = client.post("/v1/categories/odd/shots", headers=ADMIN, files=[("files", ("a.png", shot, "image/png"))],
                    data={"finetune": "false", **data})
    assert r.status_code == 400 and r.headers["content-type"] == "application/json", r.text[:300]
    error = r.json()["error"]
    assert error["code"] == "invalid_geometry" and message in error["message"], error
    assert "nothing was stored" in error["message"] and error["request_id"] == r.headers[HEADER]
    assert not (store / "categories" / "odd").exists()  # not even an empty folder
    assert snapshot(store) == before


def test_feedback_images_must_fit_the_stored_geometry(client, tmp_path):
    files = [("files", (f"g{s}.png", wide_png(s), "image/png")) for s in range(4)]
    r = client.post("/v1/categories/shaft/shots", headers=ADMIN, files=files,
                    data={"finetune": "false", "roi": "10,5,140,55"})
    assert r.status_code == 201, r.text
    before = snapshot(tmp_path / "store")
    small = [("files", ("small.png", wide_png(30, width=100, height=50), "image/png"))]
    for label in ("good", "defect"):
        r = client.post("/v1/categories/shaft/feedback", headers=ADMIN, files=small, data={"label": label})
        assert r.status_code == 400, r.text[:300]
        assert r.json()["error"]["code"] == "invalid_geometry" and "outside the 100x50 image" in r.text
        assert snapshot(tmp_path / "store") == before


def test_an_unexpected_error_answers_the_json_error_shape_and_is_logged(tmp_path, tiny_backbone, caplog):
    app = create_app(make_settings(tmp_path / "store"), backbone=tiny_backbone)

    async def broken() -> None:  # stands in for any bug or broken dependency below a route
        raise RuntimeError("disk on fire")

    app.add_api_route("/v1/broken", broken)
    with TestClient(app, raise_server_exceptions=False) as client, caplog.at_level(logging.ERROR):
        r = client.get("/v1/broken", headers={HEADER: "part-4711"})
    assert r.status_code == 500 and r.headers["content-type"] == "application/json", r.text[:300]
    error = r.json()["error"]
    assert error["code"] == "internal_error" and error["request_id"] == "part-4711"
    assert "disk on fire" not in error["message"]  # internals stay in the log
    assert r.headers[HEADER] == "part-4711"
    logged = [rec for rec in caplog.records if "part-4711" in rec.getMessage()]
    assert logged and logged[0].exc_info is not None and "disk on fire" in str(logged[0].exc_info[1])


def test_auto_tiles_on_a_long_strip_fall_back_to_one_view():
    # 8192 x 512 at 0.25 overlap would need 22 tiles of the largest size (512 px): over the cap, so one
    # native view (16:1, the aspect limit) is used instead of refusing a line-scan camera's frames.
    g = build_geometry([(8192, 512)], size=320, multiple=16)
    assert g.tiles is None and g.resize == "native" and "no tiles" in g.rule
    check_usable(g, [(8192, 512)], 320)


def test_a_stored_geometry_over_the_limits_is_refused_for_new_shots(tiny_detector):
    wide = Geometry(resize="native", frame=(8, 4096))  # 8x the tiny model's 64x64 input, e.g. from an old bundle
    with pytest.raises(GeometryError, match="model frame 4096x8 px is over 2x"):
        tiny_detector.resolve_geometry(wide, [(3200, 200)])
    tiles = Geometry(tiles=(5, 7), tile_size=(0.3, 0.3))
    with pytest.raises(GeometryError, match="35 tiles per image"):
        tiny_detector.resolve_geometry(tiles, [(1200, 900)])
