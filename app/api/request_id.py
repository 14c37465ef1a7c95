"""Request IDs: every response carries ``X-Request-ID``, every error body and server log line names it.

Why: when a line's MES flags a verdict or a request fails, the operator needs to find that one request
in the service's logs. A caller may send its own ``X-Request-ID`` (its part number, a trace id); a
well-formed one is kept, anything else is replaced by a fresh random id, so log lines can't be forged
or flooded through the header. Every response also names the process that answered
(``X-Clipshot-Replica``), so an answer can be traced to a replica behind a load balancer or Ray Serve.
"""

from __future__ import annotations

import contextvars
import logging
import re
import uuid

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core.identity import replica_name

HEADER = "X-Request-ID"
REPLICA_HEADER = "X-Clipshot-Replica"  # which process answered (app.core.identity): affinity and tracing
_VALID = re.compile(r"^[A-Za-z0-9._:/-]{1,128}$")
_current: contextvars.ContextVar[str | None] = contextvars.ContextVar("clipshot_request_id", default=None)


def accepted_request_id(offered: str | None) -> str:
    """The caller's id when well-formed, else a fresh random one."""
    return offered if offered is not None and _VALID.fullmatch(offered) else uuid.uuid4().hex


def current_request_id() -> str | None:
    """The id of the request being handled in this context (None outside a request)."""
    return _current.get()


class RequestIdMiddleware:
    """Pure-ASGI and outermost, so even a 413 from the body-size limit carries the header."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = accepted_request_id(Headers(scope=scope).get(HEADER))
        scope.setdefault("state", {})["request_id"] = request_id
        token = _current.set(request_id)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers[HEADER] = request_id
                headers[REPLICA_HEADER] = replica_name()
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            _current.reset(token)


class RequestIdLogFilter(logging.Filter):
    """Adds ``record.request_id`` ("-" outside requests) so a log format can print it."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = _current.get() or "-"
        return True
