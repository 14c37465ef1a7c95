"""decode_image: every accepted pixel mode converts correctly, every rejected class gets its status."""

from __future__ import annotations

import hashlib
import io
import random
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from app.errors import ImageError
from app.serving.images import decode_image

BIG = 10**9


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def decode(data: bytes, *, max_pixels: int = BIG, max_bytes: int = BIG):
    return decode_image(data, max_pixels=max_pixels, max_bytes=max_bytes)


def rejected(data: bytes, **kw) -> ImageError:
    with pytest.raises(ImageError) as info:
        decode(data, **kw)
    return info.value


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG header claiming a size, followed by a few bytes of pixel data (far too few)."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        body = kind + payload
        return struct.pack(">I", len(payload)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 16)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


# --- accepted ---------------------------------------------------------------------------------


def test_rgb_passthrough_reports_hash_size_and_format():
    img = Image.new("RGB", (7, 5), (10, 20, 30))
    data = encode(img)
    out = decode(data)
    assert out.image.mode == "RGB"
    assert out.image.getpixel((3, 2)) == (10, 20, 30)
    assert out.sha256 == hashlib.sha256(data).hexdigest()
    assert out.original_size == (7, 5) == out.size
    assert (out.format, out.original_mode) == ("PNG", "RGB")


def test_grayscale_becomes_equal_rgb_channels():
    out = decode(encode(Image.new("L", (4, 4), 77)))
    assert out.original_mode == "L"
    assert out.image.mode == "RGB"
    assert out.image.getpixel((0, 0)) == (77, 77, 77)


@pytest.mark.parametrize("mode", ["LA", "RGBA"])
def test_alpha_is_composited_over_black(mode):
    color = (200, 255) if mode == "LA" else (200, 100, 50, 255)
    img = Image.new(mode, (3, 1), color)
    # (0,0) opaque, (1,0) fully transparent with bright hidden colour, (2,0) half transparent
    img.putpixel((1, 0), (255, 0) if mode == "LA" else (255, 255, 255, 0))
    img.putpixel((2, 0), (200, 128) if mode == "LA" else (200, 100, 50, 128))
    out = decode(encode(img)).image
    assert out.mode == "RGB"
    opaque = (200, 200, 200) if mode == "LA" else (200, 100, 50)
    assert out.getpixel((0, 0)) == opaque
    assert out.getpixel((1, 0)) == (0, 0, 0)
    half = out.getpixel((2, 0))
    for got, full in zip(half, opaque, strict=True):
        assert abs(got - full * 128 / 255) <= 1


def test_palette_without_and_with_transparency():
    img = Image.new("P", (2, 1))
    img.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 9))
    img.putpixel((0, 0), 1)
    img.putpixel((1, 0), 2)
    out = decode(encode(img))
    assert out.original_mode == "P"
    assert [out.image.getpixel((x, 0)) for x in range(2)] == [(255, 0, 0), (0, 255, 0)]
    # index 2 (green) marked transparent -> black
    out = decode(encode(img, transparency=2)).image
    assert [out.getpixel((x, 0)) for x in range(2)] == [(255, 0, 0), (0, 0, 0)]


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_sixteen_bit_is_rescaled_not_clipped(fmt):
    values = np.array([0, 257, 1000, 32896, 65280, 65535], dtype=np.uint16)
    img = Image.fromarray(np.tile(values, (3, 1)))
    assert img.mode.startswith("I;16")
    out = decode(encode(img, fmt))
    assert out.original_mode in {"I;16", "I;16B", "I;16L", "I"}
    got = np.asarray(out.image)[1, :, 0]
    expected = np.round(values.astype(float) * 255 / 65535).astype(np.uint8)
    assert got.tolist() == expected.tolist() == [0, 1, 4, 128, 254, 255]
    assert (np.asarray(out.image)[..., 0] == np.asarray(out.image)[..., 2]).all()


def test_cmyk_jpeg_converts_to_rgb():
    cmyk = Image.new(
        "CMYK", (16, 16), (0, 255, 255, 0)
    )  # pure red in CMYK; Pillow writes Adobe-inverted JPEG
    out = decode(encode(cmyk, "JPEG", quality=95))
    assert out.original_mode == "CMYK"
    r, g, b = out.image.getpixel((8, 8))
    assert r > 230 and g < 30 and b < 30


def _left_red_right_blue(w: int = 40, h: int = 20) -> Image.Image:
    img = Image.new("RGB", (w, h), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, w // 2, h))
    return img


@pytest.mark.parametrize(("orientation", "red_at_top"), [(6, True), (8, False)])
def test_exif_rotation_is_applied(orientation, red_at_top):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(_left_red_right_blue(), "JPEG", quality=95, exif=exif.tobytes())
    out = decode(data)
    assert out.original_size == (40, 20)
    assert out.image.size == out.size == (20, 40)
    top, bottom = out.image.getpixel((10, 5)), out.image.getpixel((10, 34))
    red, blue = (top, bottom) if red_at_top else (bottom, top)
    assert red[0] > 200 and red[2] < 60, (top, bottom)
    assert blue[2] > 200 and blue[0] < 60, (top, bottom)


def test_no_exif_keeps_orientation():
    out = decode(encode(_left_red_right_blue(), "JPEG", quality=95))
    assert out.image.size == (40, 20)
    assert out.image.getpixel((5, 10))[0] > 200


# --- rejected ---------------------------------------------------------------------------------


def test_empty_file_is_400():
    err = rejected(b"")
    assert (err.status_code, err.code) == (400, "empty_file")


@pytest.mark.parametrize(
    "data",
    [
        random.Random(0).randbytes(4096),
        b"hello, this is not an image",
        # Pillow can parse EPS headers (and would hand the body to Ghostscript); not on our allow-list.
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n%%EndComments\n",
    ],
    ids=["random", "text", "eps"],
)
def test_non_image_is_415(data):
    err = rejected(data)
    assert (err.status_code, err.code) == (415, "unsupported_image")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file_is_400(fmt):
    noise = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise), fmt)
    err = rejected(data[: len(data) // 2])
    assert (err.status_code, err.code) == (400, "corrupt_image")


def test_header_over_pixel_limit_is_413_before_decoding():
    # 8000x8000 is under Pillow's own bomb limit, so only our header check can reject it; there is no
    # pixel data, so a decode attempt would have produced 400 instead.
    err = rejected(png_header_only(8000, 8000), max_pixels=40_000_000)
    assert (err.status_code, err.code) == (413, "image_too_large")


def test_header_over_pillow_bomb_limit_is_413():
    err = rejected(png_header_only(100_000, 100_000))
    assert (err.status_code, err.code) == (413, "image_too_large")


def test_real_image_over_small_pixel_limit_is_413_and_at_limit_passes():
    data = encode(Image.new("RGB", (100, 50)))
    err = rejected(data, max_pixels=4999)
    assert (err.status_code, err.code) == (413, "image_too_large")
    assert decode(data, max_pixels=5000).size == (100, 50)


def test_oversized_upload_is_413_and_at_limit_passes():
    data = encode(Image.new("RGB", (8, 8)))
    err = rejected(data, max_bytes=len(data) - 1)
    assert (err.status_code, err.code) == (413, "upload_too_large")
    assert decode(data, max_bytes=len(data)).size == (8, 8)


def test_image_error_body_and_status_guard():
    err = ImageError(415, "unsupported_image", "nope")
    assert err.body() == {"error": {"code": "unsupported_image", "message": "nope"}}
    with pytest.raises(ValueError):
        ImageError(404, "x", "y")
