"""Limits on what one request may bring: bytes, decoded pixels, overlay size, images unlike the product's shots.

One group of the one ``Settings`` object (inherited, read from ``CLIPSHOT_*`` like every other setting). They are
decided from headers and image headers before anything is decoded (``app/serving/pixel_budget.py``,
``app/serving/images.py``); how they must relate to each other (a request bound at least an image bound, and so
on) is checked by ``Settings`` with the few-shot limits they depend on.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

MiB = 1024 * 1024


class UploadLimits(BaseModel):
    """Per-file, per-request and in-flight bounds on uploads, and what to do with images unlike the shots."""

    max_upload_bytes: int = Field(
        20 * MiB, ge=1, description="Largest accepted single image file (bytes); larger -> 413."
    )
    max_request_bytes: int = Field(
        256 * MiB,
        ge=1,
        description="Largest accepted request body (bytes) over all files; larger -> 413. "
        "Must be at least `max_upload_bytes`.",
    )
    max_image_pixels: int = Field(
        40_000_000,
        ge=1,
        description="Largest accepted image area (width x height) read from the header before decoding; "
        "guards against decompression bombs -> 413.",
    )
    max_request_pixels: int = Field(
        64_000_000,
        ge=1,
        description="Most decoded pixels (sum of width x height over its images, read from the headers before "
        "anything is decoded) one predict request may carry -> 413 (registration and feedback have their own "
        "bound, `max_register_pixels`). Must be at least `max_image_pixels`.",
    )
    max_register_pixels: int | None = Field(
        None,
        ge=1,
        description="Most decoded pixels (sum over its images, read from the headers) one registration or "
        "feedback request may carry -> 413; they are never decoded all at once: the upload check decodes one "
        "image at a time and the fit holds working-size copies, except that a tiled geometry fits at full "
        "resolution, so a fit may hold every upload decoded (about 3 bytes a pixel) and the request holds this "
        "much of `max_inflight_pixels` while it runs. Empty: `max_shots` x 12 MP (192 MP, 16 shots of a "
        "12 MP camera), capped at `max_inflight_pixels`. Must lie between `max_image_pixels` and "
        "`max_inflight_pixels`.",
    )
    max_inflight_pixels: int = Field(
        200_000_000,
        ge=1,
        description="Most decoded pixels held by all predict, registration and feedback requests in flight "
        "together (about 3 bytes each "
        "as RGB, plus the overlay); a request that would pass it gets 503 + Retry-After before decoding. "
        "Must be at least `max_request_pixels`.",
    )
    max_overlay_side: int = Field(
        1024,
        ge=64,
        le=16384,
        description="Longest side of any heatmap picture (overlay or mask, px): larger uploads get theirs drawn on "
        "a downscaled copy (the response's `shape` says which), so its memory does not grow with the upload; "
        "`heatmap_size` may ask for smaller.",
    )

    refuse_mismatched_images: bool = Field(
        False,
        description="Answer 400 `image_mismatch` for an upload unlike the product's shots (far smaller, "
        "another colour mode or aspect ratio) instead of scoring it with a `warnings` entry.",
    )
