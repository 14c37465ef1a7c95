"""Typed HTTP errors with one JSON shape for every failure the API reports.

Services raise these instead of ``fastapi.HTTPException`` so that the status code, a stable
machine-readable ``code`` and a human ``message`` travel together, and clients on the production
line can branch on ``error.code`` without parsing prose. Wire-format::

    {"error": {"code": "image_too_large", "message": "...", "request_id": "..."}}

``install_error_handlers(app)`` renders these, plain ``HTTPException`` and request-validation
errors in that same shape, and any *unexpected* exception as a 500 ``internal_error`` in it too (logged with
its traceback and request id), never Starlette's ``text/plain`` page.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.api.request_id import HEADER as REQUEST_ID_HEADER
from app.api.request_id import current_request_id

log = logging.getLogger(__name__)


class ClipshotHTTPError(Exception):
    """Base class: an error that maps to exactly one HTTP response."""

    status_code: int = 500
    code: str = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        status_code: int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status_code is not None:
            self.status_code = status_code
        self.headers: dict[str, str] = dict(headers or {})

    def body(self) -> dict[str, Any]:
        """The JSON body, kept separate from the response so tests and logs can use it."""
        error = {"code": self.code, "message": self.message}
        request_id = current_request_id()
        if request_id is not None:
            error["request_id"] = request_id
        return {"error": error}

    def to_response(self) -> JSONResponse:
        """Render as a JSONResponse carrying the status and any extra headers."""
        return JSONResponse(self.body(), status_code=self.status_code, headers=self.headers or None)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.status_code}, {self.code!r}, {self.message!r})"


class BadRequestError(ClipshotHTTPError):
    """The request is well-formed HTTP but its content is unusable (400)."""

    status_code = 400
    code = "bad_request"


class ImageError(ClipshotHTTPError):
    """An uploaded image was rejected; status is 400 (corrupt/empty), 413 (too big) or 415 (not an image)."""

    def __init__(self, status_code: int, code: str, message: str) -> None:
        if status_code not in (400, 413, 415):
            raise ValueError(f"ImageError status must be 400, 413 or 415, got {status_code}")
        super().__init__(message, code=code, status_code=status_code)


class UnauthorizedError(ClipshotHTTPError):
    """No usable credentials (401); carries ``WWW-Authenticate`` as RFC 6750 requires."""

    status_code = 401
    code = "unauthorized"

    def __init__(self, message: str, *, code: str | None = None, bearer_error: str | None = None) -> None:
        challenge = "Bearer" if bearer_error is None else f'Bearer error="{bearer_error}"'
        super().__init__(message, code=code, headers={"WWW-Authenticate": challenge})


class ForbiddenError(ClipshotHTTPError):
    """Valid credentials that lack the scope this endpoint needs (403)."""

    status_code = 403
    code = "forbidden"


class NotFoundError(ClipshotHTTPError):
    """The addressed resource (category, job, version) does not exist (404)."""

    status_code = 404
    code = "not_found"


class ConflictError(ClipshotHTTPError):
    """The request conflicts with the current state, e.g. a job already running (409)."""

    status_code = 409
    code = "conflict"


class OverloadedError(ClipshotHTTPError):
    """The service sheds load (503); ``Retry-After`` tells well-behaved clients when to come back."""

    status_code = 503
    code = "overloaded"

    def __init__(self, message: str, *, retry_after: float = 1.0, code: str | None = None) -> None:
        self.retry_after = max(1, math.ceil(retry_after))  # Retry-After takes whole seconds
        super().__init__(message, code=code, headers={"Retry-After": str(self.retry_after)})


def _status_code_name(status: int) -> str:
    try:
        return HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")
    except ValueError:
        return f"http_{status}"


async def _clipshot_handler(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ClipshotHTTPError)
    return exc.to_response()


def allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this path (Starlette's 405 names only the first route's methods)."""
    methods, path = {"OPTIONS"}, request.url.path
    stack = list(request.app.router.routes)
    while stack:
        route = stack.pop()
        if (included := getattr(route, "original_router", None)) is not None:  # FastAPI's include_router wrapper
            stack.extend(included.routes)
        elif (regex := getattr(route, "path_regex", None)) is not None and regex.match(path):
            methods |= set(getattr(route, "methods", None) or ())
    return sorted(methods)


async def _http_exception_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 405:  # also how OPTIONS reaches us: no route declares it
        allow = ", ".join(allowed_methods(request))
        if request.method == "OPTIONS":
            return Response(status_code=204, headers={"Allow": allow})
        exc.headers = {**(exc.headers or {}), "Allow": allow}
    message = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
    code = getattr(exc, "code", None) or _status_code_name(exc.status_code)  # subclasses may pin a stable code
    err = ClipshotHTTPError(message, code=code, status_code=exc.status_code, headers=exc.headers)
    return err.to_response()


async def _validation_handler(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    parts = []
    for e in exc.errors():
        loc = ".".join(str(p) for p in e.get("loc", ()))
        parts.append(f"{loc}: {e.get('msg', 'invalid')}" if loc else str(e.get("msg", "invalid")))
    err = ClipshotHTTPError("; ".join(parts) or "invalid request", code="validation_error", status_code=422)
    return err.to_response()


async def _unexpected_handler(request: Request, exc: Exception) -> JSONResponse:
    """Any exception no other handler took: a bug or a broken dependency, never the client's fault.

    Starlette runs this from its outermost middleware, after the request-id middleware has finished, so the
    id is read from the request's state and the header set here. The message names no internals (the
    traceback goes to the log under the same id, and Starlette re-raises for the server to log as well)."""
    request_id = request.scope.get("state", {}).get("request_id") or current_request_id()
    log.error("unexpected %s on %s %s (request %s)", type(exc).__name__, request.method, request.url.path,
              request_id, exc_info=exc)
    error = {"code": "internal_error",
             "message": "Unexpected server error; the server log has the details under this request id."}
    if request_id is not None:
        error["request_id"] = request_id
    return JSONResponse({"error": error}, status_code=500,
                        headers=None if request_id is None else {REQUEST_ID_HEADER: request_id})


def install_error_handlers(app: FastAPI) -> None:
    """Register handlers so every error response, ours or FastAPI's, has the same JSON shape."""
    app.add_exception_handler(Exception, _unexpected_handler)
    app.add_exception_handler(ClipshotHTTPError, _clipshot_handler)
    app.add_exception_handler(StarletteHTTPException, _http_exception_handler)
    app.add_exception_handler(RequestValidationError, _validation_handler)
