"""The image files of an inspection: a thumbnail or the uploaded file, and the overlay the client was answered.

Runs on the record writer's thread, never on the request path: decoding and re-encoding a frame costs
milliseconds that a prediction must not wait for. Each file is written under a temporary name and renamed, so a
reader (or a crash) never sees half a picture. Layout: ``<category>/<YYYY-MM-DD>/<uuid>[-overlay].<ext>``.
"""

from __future__ import annotations

import io
import os
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from PIL import Image

THUMBNAIL_QUALITY = 85  # JPEG quality of thumbnails: small files, no visible blocking at 256 px
_OVERLAY_EXT = {"jpeg": "jpg", "png": "png"}


@dataclass(frozen=True)
class KeptImages:
    """Paths (relative to the image folder) and total size of what was written."""

    image_path: str | None = None
    overlay_path: str | None = None
    image_bytes: int = 0


def thumbnail(data: bytes, size: int) -> bytes:
    """A JPEG of ``data``'s picture whose longer side is at most ``size`` pixels."""
    with Image.open(io.BytesIO(data)) as image:
        image.draft("RGB", (size, size))  # JPEG: decode at a reduced scale, much faster for large frames
        small = image.convert("RGB")
    return thumbnail_of(small, size)


def thumbnail_of(picture: Image.Image, size: int) -> bytes:
    """A JPEG of an already decoded ``picture`` whose longer side is at most ``size`` pixels."""
    small = picture.convert("RGB") if picture.mode != "RGB" else picture.copy()
    small.thumbnail((size, size))
    out = io.BytesIO()
    small.save(out, format="JPEG", quality=THUMBNAIL_QUALITY)
    return out.getvalue()


def _extension(data: bytes) -> str:
    try:
        with Image.open(io.BytesIO(data)) as image:
            return (image.format or "bin").lower().replace("jpeg", "jpg")
    except Exception:  # the prediction accepted it, so this is only about the file name
        return "bin"


def _write(root: Path, relative: str, data: bytes) -> None:
    target = root / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".tmp-{target.name}")
    temporary.write_bytes(data)
    os.replace(temporary, target)


def keep_images(root: Path, *, mode: str, category: str, upload: bytes | None, overlay: bytes | None,
                overlay_encoding: str | None, thumbnail_size: int,
                decoded: Image.Image | None = None, decoded_overlay: Image.Image | None = None) -> KeptImages:
    """Write what ``mode`` keeps (``thumbnails`` or ``full``) and say where; nothing for other modes.

    ``decoded`` / ``decoded_overlay``: the upload and its overlay already decoded (and reduced) by the
    prediction; thumbnails are made from them instead of decoding ``upload`` / ``overlay`` again."""
    stem = f"{category}/{datetime.now(UTC):%Y-%m-%d}/{uuid.uuid4().hex}"
    if mode == "thumbnails" and decoded is not None:
        picture, image_path = thumbnail_of(decoded, thumbnail_size), f"{stem}.jpg"
    elif mode == "thumbnails" and upload is not None:
        picture, image_path = thumbnail(upload, thumbnail_size), f"{stem}.jpg"
    elif mode == "full" and upload is not None:
        picture, image_path = upload, f"{stem}.{_extension(upload)}"
    else:
        return KeptImages()
    _write(root, image_path, picture)
    written, overlay_path = len(picture), None
    if mode == "thumbnails" and decoded_overlay is not None:
        overlay, overlay_path = thumbnail_of(decoded_overlay, thumbnail_size), f"{stem}-overlay.jpg"
        _write(root, overlay_path, overlay)
        written += len(overlay)
    elif overlay is not None and overlay_encoding in _OVERLAY_EXT:
        if mode == "thumbnails":
            overlay, overlay_path = thumbnail(overlay, thumbnail_size), f"{stem}-overlay.jpg"
        else:
            overlay_path = f"{stem}-overlay.{_OVERLAY_EXT[overlay_encoding]}"
        _write(root, overlay_path, overlay)
        written += len(overlay)
    return KeptImages(image_path, overlay_path, written)
