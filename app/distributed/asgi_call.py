"""One HTTP exchange as plain data, and running it through an in-process ASGI app.

Why: under Ray Serve the router receives HTTP and the detector replica runs the unchanged clipshot FastAPI
app; the request crosses the process boundary as this picklable record (Ray serialises it), and the
replica replays it into its app without a socket, so every route, auth check, error shape and middleware
behaves exactly as under ``clipshot serve``. ``extra_scope`` lets the replica hand the app facts HTTP
clients must not be able to set (the version the router pinned).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from starlette.types import ASGIApp, Message

Headers = list[tuple[bytes, bytes]]


@dataclass(frozen=True)
class HttpRequest:
    """What the router read: method, path, raw query, headers and the whole (size-bounded) body."""

    method: str
    path: str
    query_string: bytes = b""
    headers: Headers = field(default_factory=list)
    body: bytes = b""
    client: tuple[str, int] | None = None
    scheme: str = "http"


@dataclass
class HttpResponse:
    """What the app answered; ``header`` reads one value case-insensitively."""

    status: int
    headers: Headers = field(default_factory=list)
    body: bytes = b""

    def header(self, name: str) -> str | None:
        key = name.lower().encode("latin-1")
        return next((v.decode("latin-1") for k, v in self.headers if k.lower() == key), None)


async def call_asgi(app: ASGIApp, request: HttpRequest, extra_scope: Mapping[str, Any] | None = None
                    ) -> HttpResponse:
    """Run ``request`` through ``app`` (its lifespan already started) and collect the whole response."""
    scope: dict[str, Any] = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
        "method": request.method.upper(), "scheme": request.scheme, "path": request.path,
        "raw_path": request.path.encode("utf-8"), "query_string": request.query_string, "root_path": "",
        "headers": [(k.lower(), v) for k, v in request.headers],  # ASGI wants lower-case names
        "client": request.client, "server": ("ray-serve", 0),
    }
    scope.update(extra_scope or {})
    body_sent = False
    done = asyncio.Event()
    response = HttpResponse(status=500)
    chunks: list[bytes] = []

    async def receive() -> Message:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await done.wait()  # the "client" stays connected until the whole answer is sent
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            response.status = message["status"]
            response.headers = [(bytes(k), bytes(v)) for k, v in message.get("headers", [])]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                done.set()

    try:
        await app(scope, receive, send)
    finally:
        done.set()
    response.body = b"".join(chunks)
    return response


__all__ = ["HttpRequest", "HttpResponse", "call_asgi"]
