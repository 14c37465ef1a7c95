"""Every route either checks its key before the body is read, or is a public page on a short, reviewed list.

Why a walk over ``app.routes`` rather than a list of known paths: the decision routes were added on a router
without the auth-first route class, and an anonymous 200 MB JSON body was read into memory before its 401.
A new router that forgets the class fails here without anyone having to remember to add it to a test.
"""

from __future__ import annotations

import time

import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute
from live_server import CLIENT, live_server, read_response, status_of
from starlette.routing import BaseRoute, Mount, Route

from app.api.deps import AuthFirstRoute
from app.core.config import Settings
from app.main import create_app

# Public on purpose, and bodiless (GET/HEAD only, checked below): probes an orchestrator hard-codes, the
# offline docs, the console page (its API calls carry a key) and their static files. /metrics is guarded by
# the auth-first class itself (a key only when CLIPSHOT_METRICS_REQUIRE_KEY is set).
PUBLIC_ROUTES = {"/healthz", "/readyz", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc", "/console"}
PUBLIC_MOUNTS = {"/docs-assets", "/console/assets"}
BODYLESS = {"GET", "HEAD"}
SLACK_S = 1.5  # a refusal takes milliseconds; slack for a 2-core box shared with other jobs


def all_routes(app: FastAPI) -> list[BaseRoute]:
    """``app.routes`` with included routers opened (this FastAPI wraps each in an ``_IncludedRouter``)."""
    found, stack = [], list(app.routes)
    while stack:
        route = stack.pop()
        if (included := getattr(route, "original_router", None)) is not None:
            stack.extend(included.routes)
        else:
            found.append(route)
    return found


def test_every_route_checks_its_key_before_the_body_or_is_a_bodyless_public_page():
    app = create_app(Settings(_env_file=None, backbone="test:tiny-clip", device="cpu", admin_keys=["a"]))
    routes = all_routes(app)
    unguarded, public_with_body, seen = [], [], set()
    for route in routes:
        if isinstance(route, Mount):
            assert route.path in PUBLIC_MOUNTS, f"unexpected mount {route.path}"
            seen.add(route.path)
            continue
        assert isinstance(route, Route), f"unexpected route type {type(route).__name__} at {route}"
        if route.path in PUBLIC_ROUTES:
            seen.add(route.path)
            if not set(route.methods or ()) <= BODYLESS:
                public_with_body.append(f"{sorted(route.methods)} {route.path}")
            continue
        guarded = isinstance(route, AuthFirstRoute) and route.required_scope is not None
        if not guarded:
            unguarded.append(f"{sorted(route.methods or ())} {route.path} ({type(route).__name__})")
    assert not unguarded, f"routes that read a body before checking the key: {unguarded}"
    assert not public_with_body, f"public routes must not take a body: {public_with_body}"
    assert seen == PUBLIC_ROUTES | PUBLIC_MOUNTS, f"stale allow-list entries: {PUBLIC_ROUTES | PUBLIC_MOUNTS - seen}"
    # The routes the audit found open are among those walked (the walk itself must not miss them).
    paths = {(m, r.path) for r in routes if isinstance(r, APIRoute) for m in r.methods}
    assert ("PUT", "/v1/categories/{category}/threshold") in paths
    assert ("POST", "/v1/categories/{category}/feedback") in paths
    assert ("GET", "/v1/categories/{category}/scores") in paths
    # The product page's read routes are walked too (they read no body, but must still want a key).
    assert ("GET", "/v1/categories/{category}/shots/{sha256}/thumbnail") in paths
    assert ("GET", "/v1/categories/{category}/inspections/trend") in paths


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with live_server(tmp_path_factory.mktemp("guards"), CLIPSHOT_BODY_TIMEOUT_S="5") as live:
        yield live


@pytest.mark.parametrize(("key", "method", "path", "content_type", "expected"), [
    (None, "PUT", "/v1/categories/widget/threshold", "application/json", 401),
    (CLIENT, "PUT", "/v1/categories/widget/threshold", "application/json", 403),
    (None, "POST", "/v1/categories/widget/feedback", "multipart/form-data; boundary=xx", 401),
    (CLIENT, "POST", "/v1/categories/widget/feedback", "multipart/form-data; boundary=xx", 403),
    (None, "DELETE", "/v1/categories/widget/shots/" + "0" * 64, "application/json", 401),
])
def test_decision_routes_refuse_a_keyless_body_before_reading_it(server, key, method, path, content_type,
                                                                  expected):
    """A declared 200 MiB body, of which 1 KB is sent: the answer must come from the headers alone.

    Before the fix the server waited for the body (here until the 5 s body timeout, 408) and, when it came,
    read all of it into memory before answering 401."""
    sock = server.connect()
    auth = b"" if key is None else b"Authorization: Bearer " + key.encode() + b"\r\n"
    sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\n".encode() + auth +
                 f"Content-Type: {content_type}\r\nContent-Length: {200 << 20}\r\n\r\n".encode() + b"{" * 1000)
    start = time.monotonic()
    raw = read_response(sock, timeout=15)
    sock.close()
    assert status_of(raw) == expected, raw[:300]
    assert b"connection: close" in raw.lower()  # the client is told to stop sending the rest
    assert time.monotonic() - start < SLACK_S
