"""Decoded-pixel budget: bounds the memory predict requests may take, decided from image headers alone.

Why: compressed size says nothing about decoded size. A 120 KB PNG of zeros decodes to 6324 x 6324 x 3
bytes (120 MB), and a request may carry 32 images; in the audit four such PNGs raised the server from
2.8 to 5.2 GB. Each request declares its pixels (sum of width x height from the headers) before anything
is decoded: over ``max_request_pixels`` it is refused with 413, and when the requests in flight already
hold ``max_inflight_pixels`` it gets 503 + Retry-After, so memory stays bounded however clients behave.

Registration and feedback uploads are admitted the same way (``fit_admitted``): one in-flight budget for the
whole process, since their decodes share its memory with predictions, but their own per-request bound
(``max_register_pixels``): they decode one image at a time and fit on working-size copies
(``shot_ledger.decode_for_fit``), so a line camera's 16 shots need not fit a predict request's bound.

Giving memory back: glibc keeps freed blocks of worker threads' arenas mapped, so after a spike the
process stayed at 4 GB while idle. When the last large request finishes, ``malloc_trim(0)`` returns
those pages to the OS (a no-op where glibc is absent); after every fit too, which frees a whole
category's features at once.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
from collections.abc import AsyncIterator, Callable, Sequence

from starlette.concurrency import run_in_threadpool

from app.errors import ClipshotHTTPError, ImageError, OverloadedError
from app.serving.images import header_pixels

log = logging.getLogger(__name__)
TRIM_AFTER_PIXELS = 4_000_000  # ~12 MB of RGB: below that the allocator's reuse is worth more than a trim


def _load_malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # musl, macOS: nothing to trim
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


_MALLOC_TRIM = _load_malloc_trim()


def release_free_memory() -> bool:
    """Return freed heap pages to the OS (glibc ``malloc_trim``); False where unsupported."""
    if _MALLOC_TRIM is None:
        return False
    _MALLOC_TRIM(0)
    return True


class PixelBudget:
    """Admission by decoded pixels, per request and across requests in flight (event-loop only, no lock)."""

    def __init__(self, max_request_pixels: int, max_inflight_pixels: int,
                 max_fit_pixels: int | None = None) -> None:
        self.max_request = max_request_pixels
        self.max_inflight = max_inflight_pixels
        self.max_fit = max_request_pixels if max_fit_pixels is None else max_fit_pixels
        self.inflight = 0
        self._since_trim = 0  # pixels admitted since the last trim

    def acquire(self, pixels: int, *, fit: bool = False) -> None:
        """Reserve ``pixels`` or raise 413 (never fits) / 503 (does not fit now); call ``release`` after.
        ``fit``: a registration or feedback upload, bounded by ``max_fit`` instead of ``max_request``."""
        limit, setting = ((self.max_fit, "CLIPSHOT_MAX_REGISTER_PIXELS") if fit
                          else (self.max_request, "CLIPSHOT_MAX_REQUEST_PIXELS"))
        if pixels > limit:
            raise ClipshotHTTPError(
                f"the images decode to {pixels} pixels in total; at most {limit} per request "
                f"({setting}): send fewer or smaller images",
                code="request_too_many_pixels", status_code=413)
        if self.inflight + pixels > self.max_inflight:
            raise OverloadedError(
                f"{self.inflight} decoded pixels are already in flight (limit {self.max_inflight}, "
                "CLIPSHOT_MAX_INFLIGHT_PIXELS); retry shortly", code="overloaded_pixels")
        self.inflight += pixels
        self._since_trim += pixels

    def release(self, pixels: int) -> bool:
        """Give ``pixels`` back; True when the service went idle after large images (time to trim)."""
        self.inflight -= pixels
        if self.inflight == 0 and self._since_trim >= TRIM_AFTER_PIXELS:
            self._since_trim = 0
            return True
        return False


def upload_pixels(files: Sequence[tuple[str, bytes]], *, max_pixels: int, max_bytes: int) -> int:
    """Sum of width x height over uploaded ``(filename, bytes)`` from their headers (nothing decoded);
    a file that fails the header checks raises its ``ImageError`` naming it."""
    total = 0
    for filename, data in files:
        try:
            total += header_pixels(data, max_pixels=max_pixels, max_bytes=max_bytes)
        except ImageError as exc:
            raise ImageError(exc.status_code, exc.code, f"{filename or 'unnamed file'}: {exc.message}") from exc
    return total


@contextlib.asynccontextmanager
async def fit_admitted(budget: PixelBudget, pixels: int) -> AsyncIterator[None]:
    """Hold ``pixels`` of the budget (413 / 503 as for predictions) while a fit runs, then give memory back."""
    budget.acquire(pixels, fit=True)
    try:
        yield
    finally:
        budget.release(pixels)
        await run_in_threadpool(release_free_memory)
