"""Bytes of request bodies the Ray router holds at once, bounded.

Why: the router reads a whole body before it forwards it (a replica replays the request without a socket) and
keeps it until the replica answers. With hundreds of requests in flight of up to ``max_request_bytes`` each, a
burst of large uploads would hold gigabytes in one small CPU actor. Each request reserves its bytes before they
are read (its Content-Length up front, a chunked body chunk by chunk); one that would pass the budget is refused
at once with 503 + Retry-After, before the rest of its body is read, and its reservation is returned when its
answer is sent.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.requests import Request

from app.errors import ClipshotHTTPError, OverloadedError

RETRY_AFTER_S = 1  # bodies in flight are answered in a forward's time; the next try usually fits


class BodyBudget:
    """``hold(request)``: the request's whole body, its bytes counted against ``limit`` until the block ends."""

    def __init__(self, limit: int, per_request: int) -> None:
        self.limit = limit
        self.per_request = per_request
        self._held = 0
        self._lock = threading.Lock()

    @property
    def held(self) -> int:
        """Bytes reserved by requests in flight."""
        return self._held

    @asynccontextmanager
    async def hold(self, request: Request, *, read: bool = True) -> AsyncIterator[bytes]:
        """The body (``b""`` without ``read``), held within the budget; raises 413 past ``per_request`` and
        503 + Retry-After past the budget, reading no further."""
        reserved = 0
        try:
            if not read:
                yield b""
                return
            declared = request.headers.get("content-length", "")
            if declared.isdigit():
                reserved += self._reserve(int(declared), int(declared))
            chunks: list[bytes] = []
            size = 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > reserved:
                    reserved += self._reserve(size - reserved, size)
                chunks.append(chunk)
            yield b"".join(chunks)
        finally:
            with self._lock:
                self._held -= reserved

    def _reserve(self, more: int, total: int) -> int:
        """``more`` bytes for a body of ``total`` so far."""
        if total > self.per_request:
            raise ClipshotHTTPError(f"request body over {self.per_request} bytes", code="request_too_large",
                                    status_code=413)
        with self._lock:
            if self._held + more > self.limit:
                raise OverloadedError(f"the router holds {self._held} bytes of request bodies already (budget "
                                      f"{self.limit}); retry shortly", code="router_full", retry_after=RETRY_AFTER_S)
            self._held += more
        return more


__all__ = ["BodyBudget"]
