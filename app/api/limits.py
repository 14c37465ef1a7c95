"""Request-body size limit, enforced before any byte of the body is parsed.

Why our own middleware: a declared ``Content-Length`` over the limit is answered 413 at once, before
routing, auth or multipart parsing spool anything to disk; a chunked body is counted as it streams
and cut off at the limit. Both answers use the service-wide JSON error shape (Starlette's built-in
limiter, where present, answers in plain text and only once the body is read).
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import ClipshotHTTPError

CODE = "request_too_large"


class BodyTooLarge(HTTPException):
    """Raised from ``receive``; FastAPI re-raises HTTPExceptions from body parsing unchanged."""

    code = CODE

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"The request body exceeds the limit of {limit} bytes.")


class BodySizeLimitMiddleware:
    """Pure-ASGI: 413 from Content-Length up front, or as soon as a streamed body passes ``max_bytes``."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None:
            try:
                too_big = int(declared) > self.max_bytes
            except ValueError:
                too_big = False  # the server rejects malformed lengths itself
            if too_big:
                error = ClipshotHTTPError(
                    f"The request body is {declared} bytes; the limit is {self.max_bytes} bytes "
                    "(CLIPSHOT_MAX_REQUEST_BYTES).",
                    code=CODE, status_code=413, headers={"Connection": "close"},
                )
                await error.to_response()(scope, receive, send)
                return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, limited_receive, send)
