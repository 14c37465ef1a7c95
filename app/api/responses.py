"""OpenAPI descriptions of the error answers, shared by every route so /docs and docs/reference/api.md list
each status a route can really return, in the one JSON error shape ``app.errors`` renders."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from model_store import CATEGORY_PATTERN

# The category path parameter as the server checks it (an invalid name answers 400 `invalid_category`); the
# schema states the rule without FastAPI enforcing it, so the answer keeps its documented status and code.
CATEGORY_DOC = "Product category: 1-64 characters of a-z 0-9 . _ - (starting with a letter or digit)."
CATEGORY_SCHEMA: dict[str, Any] = {"pattern": CATEGORY_PATTERN, "minLength": 1, "maxLength": 64}


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable machine-readable error code, e.g. `image_too_large`.")
    message: str = Field(description="What went wrong and what to do, for people.")
    request_id: str | None = Field(None, description="The response's `X-Request-ID`, to find it in the logs.")


class ErrorBody(BaseModel):
    error: ErrorDetail


STANDARD: dict[int, str] = {
    400: "Invalid input (corrupt or empty image, invalid name).",
    401: "Missing or unknown API key.",
    403: "The key's scope does not allow this route (a client key on an admin route).",
    404: "Unknown category, version or job.",
    409: "Conflicts with the current state.",
    413: "Request, file or image too large, or too many images.",
    415: "Not a supported image format.",
    422: "Invalid parameters.",
    503: "Overloaded, device out of memory or shutting down; honour `Retry-After`.",
}


def errors(*codes: int, **specific: str) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route: the standard text per status, or a route-specific one (``e409="..."``)."""
    out: dict[int | str, dict[str, Any]] = {}
    for code in codes:
        out[code] = {"model": ErrorBody, "description": specific.get(f"e{code}", STANDARD[code])}
    return out
