"""Turn untrusted uploaded bytes into an upright 8-bit RGB ``PIL.Image`` or a typed ``ImageError``.

Production lines send whatever their cameras write (16-bit PNG, CMYK JPEG, EXIF-rotated phone
photos, cut-outs with alpha), and attackers can send anything. Every decision here aims for the
model seeing the same pixels a human sees in an image viewer, and for bad input failing fast with a
status code the client can act on:

* empty file -> 400 ``empty_file``; over ``max_bytes`` -> 413 ``upload_too_large`` (checked first,
  before any parsing);
* not a recognised image format -> 415 ``unsupported_image`` (only raster formats on an allow-list are
  probed, so e.g. EPS never reaches Ghostscript);
* header area over ``max_pixels`` -> 413 ``image_too_large``, decided from the header *before* the
  pixel data is decoded (decompression-bomb guard); Pillow's own global bomb limit also maps to 413;
* truncated or corrupt data -> 400 ``corrupt_image``; we force a full decode with ``load()`` and never
  enable ``ImageFile.LOAD_TRUNCATED_IMAGES``, so half an image is never scored as if it were whole.

Conversions: the EXIF orientation is applied first (the result is upright). Alpha (LA, RGBA, PA,
palette transparency) is **composited over black**: inspection cut-outs are then stable regardless of
the junk a tool left in fully transparent pixels, and shots and test images get the same background.
16-bit grey (``I;16*``/``I``) is rescaled linearly 0..65535 -> 0..255 (Pillow's ``convert("L")`` would
clip everything above 255 to white). CMYK (including Adobe-inverted JPEG) and YCbCr go through
Pillow's converters. Float (``F``) images are refused with 415: their value range is unknowable.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from app.errors import ImageError

# Raster formats a camera or inspection tool writes. MPO is how Pillow names many camera JPEGs.
ALLOWED_FORMATS: tuple[str, ...] = ("JPEG", "MPO", "PNG", "BMP", "TIFF", "WEBP", "GIF")
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
_ALPHA_MODES = {"LA", "La", "RGBA", "RGBa", "PA"}


@dataclass(frozen=True)
class DecodedImage:
    """A decoded upload: the upright RGB image plus what callers need to log, dedupe and report it."""

    image: Image.Image  # mode "RGB", EXIF orientation applied
    sha256: str  # hex digest of the uploaded bytes, for dedupe and audit logs
    original_size: tuple[int, int]  # (width, height) as stored in the file, before EXIF rotation
    format: str  # Pillow format name, e.g. "PNG"
    original_mode: str  # Pillow mode before conversion, e.g. "I;16" or "CMYK"

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the returned upright image; equals ``original_size`` unless rotated 90°."""
        return self.image.size


def decode_image(data: bytes, *, max_pixels: int, max_bytes: int) -> DecodedImage:
    """Decode one uploaded file fully and safely, or raise ``ImageError`` with the right status."""
    _check_bytes(data, max_bytes)
    digest = hashlib.sha256(data).hexdigest()
    img = _open(data, max_pixels)
    rgb: Image.Image | None = None
    try:
        try:
            img.load()  # full decode: truncated or corrupt data raises here, never silently padded
        except Image.DecompressionBombError as e:
            raise _too_large(img.size, max_pixels) from e
        except Exception as e:  # any decoder failure on untrusted bytes means "corrupt"
            raise ImageError(
                400,
                "corrupt_image",
                f"The {img.format} file is truncated or corrupt and cannot be decoded: {e}",
            ) from e
        fmt, mode, size = img.format or "unknown", img.mode, img.size
        upright = _exif_upright(img)
        # An upright RGB file is returned as decoded: a copy would double the peak memory of a large upload.
        rgb = upright if upright.mode == "RGB" else to_rgb(upright)
    finally:
        if rgb is not img:
            img.close()
    return DecodedImage(image=rgb, sha256=digest, original_size=size, format=fmt, original_mode=mode)


def header_pixels(data: bytes, *, max_pixels: int, max_bytes: int) -> int:
    """Width x height from the file's header alone (nothing decoded), with the same checks as ``decode_image``.

    Lets a request's pixel budget be decided before any pixel is decoded.
    """
    _check_bytes(data, max_bytes)
    img = _open(data, max_pixels)
    try:
        return img.size[0] * img.size[1]
    finally:
        img.close()


def upright_size(data: bytes, *, max_pixels: int, max_bytes: int) -> tuple[int, int]:
    """(width, height) of the image ``decode_image`` would return, from the header and EXIF alone.

    Lets a category's geometry be checked against its stored shots without decoding any of them."""
    _check_bytes(data, max_bytes)
    img = _open(data, max_pixels)
    try:
        width, height = img.size
        try:
            turned = img.getexif().get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8)  # the 90-degree ones
        except Exception:  # broken EXIF: decode_image keeps the stored orientation too
            turned = False
        return (height, width) if turned else (width, height)
    finally:
        img.close()


def _check_bytes(data: bytes, max_bytes: int) -> None:
    if not data:
        raise ImageError(400, "empty_file", "The uploaded file is empty.")
    if len(data) > max_bytes:
        raise ImageError(
            413,
            "upload_too_large",
            f"The file is {len(data)} bytes; the limit is {max_bytes} bytes per image.",
        )


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """Identify the format and read only the header, then enforce the pixel budget before decoding."""
    formats = [f for f in ALLOWED_FORMATS if f in Image.OPEN or _register_plugins(f)]
    try:
        img = Image.open(io.BytesIO(data), formats=formats)
    except UnidentifiedImageError as e:
        raise ImageError(
            415,
            "unsupported_image",
            f"The file is not a supported image; accepted formats: {', '.join(ALLOWED_FORMATS)}.",
        ) from e
    except Image.DecompressionBombError as e:
        raise ImageError(413, "image_too_large", f"The image header declares too many pixels: {e}") from e
    except Exception as e:  # a plugin choking on a malformed header
        raise ImageError(400, "corrupt_image", f"The image header is corrupt: {e}") from e
    width, height = img.size
    if width <= 0 or height <= 0:
        img.close()
        raise ImageError(400, "corrupt_image", f"The image header declares an empty size {width}x{height}.")
    if width * height > max_pixels:
        img.close()
        raise _too_large(img.size, max_pixels)
    return img


def _register_plugins(fmt: str) -> bool:
    Image.init()
    return fmt in Image.OPEN


def _too_large(size: tuple[int, int], max_pixels: int) -> ImageError:
    w, h = size
    return ImageError(
        413,
        "image_too_large",
        f"The image is {w}x{h} = {w * h} pixels; the limit is {max_pixels} pixels. "
        "Downscale it before upload.",
    )


def _exif_upright(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation; a broken EXIF block keeps the stored orientation instead of failing."""
    try:
        if img.getexif().get(ExifTags.Base.Orientation, 1) in (0, 1):
            return img  # already upright: exif_transpose would still return a full copy
        return ImageOps.exif_transpose(img) or img
    except Exception:  # metadata damage must not reject an otherwise valid photo
        return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any supported Pillow mode to 8-bit RGB (alpha over black, 16-bit rescaled, CMYK via Pillow)."""
    mode = img.mode
    if mode == "RGB":
        return img.copy()
    if mode in _SIXTEEN_BIT_MODES:
        return _sixteen_bit_to_rgb(img)
    if mode == "F":
        raise ImageError(
            415, "unsupported_image", "32-bit float images are not supported; export 8- or 16-bit instead."
        )
    if mode == "P" and "transparency" in img.info:
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (0, 0, 0))
        background.paste(rgba.convert("RGB"), mask=rgba.getchannel("A"))
        return background
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as e:
        raise ImageError(415, "unsupported_image", f"Pixel mode {mode!r} cannot be converted to RGB.") from e


def _sixteen_bit_to_rgb(img: Image.Image) -> Image.Image:
    """Linear 0..65535 -> 0..255 with rounding, so dark 16-bit images keep their contrast."""
    arr = np.asarray(img).astype(np.int64)
    arr = np.clip(arr, 0, 65535)
    eight = ((arr * 255 + 32767) // 65535).astype(np.uint8)
    return Image.fromarray(eight).convert("RGB")


def reduced_for_thumbnail(image: Image.Image, side: int) -> Image.Image:
    """``image`` shrunk by a whole factor (box average) to no less than ``side`` on its longer side.

    Made while the decoded upload is at hand, for the inspection record's thumbnail: a box reduction costs well
    under a millisecond, where decoding the upload again on the record's thread cost as much as the first decode
    and competed with predictions for the CPU. The record's writer makes the final thumbnail from it. Always a
    new image, so the upload's pixels are not kept alive by the record's queue."""
    factor = max(image.size) // side
    if factor <= 1:
        return image.copy()
    width, height = image.size  # whole boxes only (drops < factor edge pixels), so the aspect is kept
    return image.reduce(factor, box=(0, 0, width - width % factor, height - height % factor))
