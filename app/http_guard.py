"""Connection-level limits for ``clipshot serve``: header size, header/body read timeouts, connection cap.

Why a protocol subclass and not ASGI middleware: these attacks happen before the ASGI app is called.
httptools accumulates an unterminated header in memory with no bound (a 128 MiB header took 18 s and
stalled every other connection), a client may trickle a request line one byte at a time, and uvicorn
arms no timer before the first request or while a body arrives. ``GuardedHttpToolsProtocol`` wraps
uvicorn's httptools protocol and

* feeds the parser at most ``max_header_bytes`` before the end of the headers, else answers 431 and
  closes (the parser never sees the rest, so refusing costs the same for 64 KiB and 256 MiB);
* arms ``header_timeout_s`` from the connection's start and from each request's first byte to the end
  of its headers -> 408 and close;
* while a body arrives, drops the connection after ``body_timeout_s`` without a byte, or when the body
  averages under ``min_body_rate`` bytes/s once it has taken longer than ``body_timeout_s`` (a 1-byte-
  per-2-s client) -> 408 and close; time the server itself paused reading (flow control) never counts;
* answers 503 + ``Retry-After`` and closes any connection beyond ``max_connections`` -- except that up to
  ``probe_connections`` more are let in for one ``/healthz`` or ``/readyz`` request each. Why: an attacker who
  fills the cap must not make the orchestrator's probes fail and restart a healthy pod. Such a connection
  must complete a probe request within ``PROBE_GRACE_S`` (probes send theirs at once), serves that one
  request and closes; any other request on it gets the 503. When all are taken, a newcomer replaces the
  oldest that has not yet sent its request, so silent connections cannot keep the probes out for long.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.core.config import Settings

log = logging.getLogger(__name__)
_CHECK_EVERY_S = 0.5  # resolution of the body-rate check
PROBE_PATHS = frozenset({b"/healthz", b"/readyz"})
PROBE_GRACE_S = 0.5  # an over-cap connection must have sent its probe request by then (probes send at once)


@dataclass(frozen=True)
class ConnectionLimits:
    """The limits one server applies to every connection (from ``Settings``)."""

    max_header_bytes: int
    header_timeout_s: float
    body_timeout_s: float
    min_body_rate: int
    max_connections: int
    probe_connections: int = 0


def raw_error(status: int, reason: str, code: str, message: str, extra: dict[str, str] | None = None) -> bytes:
    """A complete ``Connection: close`` HTTP/1.1 error response in the service's JSON error shape."""
    body = json.dumps({"error": {"code": code, "message": message}}).encode("utf-8")
    headers = {"content-type": "application/json", "content-length": str(len(body)), "connection": "close",
               **(extra or {})}
    head = f"HTTP/1.1 {status} {reason}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    return head.encode("latin-1") + body


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol plus the limits above; build one per server with ``guarded_protocol``."""

    limits: ConnectionLimits
    parked: ClassVar[dict[GuardedHttpToolsProtocol, bool]]  # over-cap probe connections -> request seen
    _last_cap_warning = float("-inf")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._awaiting_headers = True
        self._header_bytes = 0
        self._header_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._body_started = 0.0
        self._body_last = 0.0
        self._body_bytes = 0
        self._refused = False

    # -- connection --------------------------------------------------------------------------------
    # uvicorn's parent narrows asyncio's BaseTransport to Transport; this override keeps its signature
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) - len(self.parked) > self.limits.max_connections:
            if self._park():
                self._header_timer = self.loop.call_later(PROBE_GRACE_S, self._refuse_over_cap)
                return
            now = time.monotonic()
            if now - GuardedHttpToolsProtocol._last_cap_warning >= 1.0:  # one line a second, not one per refusal
                GuardedHttpToolsProtocol._last_cap_warning = now
                log.warning("refusing connections: %d open (limit %d, CLIPSHOT_MAX_CONNECTIONS)",
                            len(self.connections) - 1, self.limits.max_connections)
            self._refuse_over_cap()
            return
        self._arm_header_timer()

    def _park(self) -> bool:
        """Take one of the probe places (replacing the oldest silent one if all are taken); False if none."""
        if len(self.parked) >= self.limits.probe_connections:
            silent = next((c for c, probing in self.parked.items() if not probing), None)
            if silent is None:
                return False
            silent._refuse_over_cap()
        self.parked[self] = False
        return True

    def _refuse_over_cap(self) -> None:
        self._refuse(503, "Service Unavailable", "too_many_connections",
                     f"The server holds its limit of {self.limits.max_connections} connections; retry shortly.",
                     {"retry-after": "1"})

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        self.parked.pop(self, None)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self._awaiting_headers:
                room = self.limits.max_header_bytes - self._header_bytes
                if room <= 0:
                    self._refuse(431, "Request Header Fields Too Large", "headers_too_large",
                                 f"The request line and headers exceed {self.limits.max_header_bytes} bytes "
                                 "(CLIPSHOT_MAX_HEADER_BYTES).")
                    return
                chunk, view = view[:room], view[room:]
                self._header_bytes += len(chunk)
            else:
                chunk, view = view, view[len(view):]
                self._body_bytes += len(chunk)
                self._body_last = time.monotonic()
            super().data_received(data if len(chunk) == len(data) else bytes(chunk))
            if self.parser is None or self.transport.is_closing():
                return

    # -- parser callbacks ------------------------------------------------------------------------------
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm_header_timer()

    def on_headers_complete(self) -> None:
        self._awaiting_headers = False
        self._header_bytes = 0
        self._cancel(self._header_timer)
        self._header_timer = None
        if self in self.parked:  # over the cap: one probe request, then the connection closes
            if self.parser.get_method() != b"GET" or httptools.parse_url(self.url).path not in PROBE_PATHS:
                self._refuse_over_cap()
                return
            self.parked[self] = True
            super().on_headers_complete()
            self.cycle.keep_alive = False
            return
        super().on_headers_complete()
        self._body_started = self._body_last = time.monotonic()
        self._body_bytes = 0
        self._body_timer = self.loop.call_later(_CHECK_EVERY_S, self._check_body)

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refused:
            return
        self._cancel(self._body_timer)
        self._body_timer = None
        self._awaiting_headers = True
        super().on_message_complete()

    # -- timers ----------------------------------------------------------------------------------------
    def _arm_header_timer(self) -> None:
        if self._header_timer is None and not self.transport.is_closing():
            self._header_timer = self.loop.call_later(self.limits.header_timeout_s, self._header_timeout)

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self._awaiting_headers and not self.transport.is_closing():
            if self._header_bytes == 0 and self.cycle is not None:  # idle between requests: keep-alive's job
                return
            self._refuse(408, "Request Timeout", "header_timeout",
                         f"The request headers did not arrive within {self.limits.header_timeout_s:g} s "
                         "(CLIPSHOT_HEADER_TIMEOUT_S).")

    def _check_body(self) -> None:
        self._body_timer = None
        if self._awaiting_headers or self.transport.is_closing():
            return
        now = time.monotonic()
        limits = self.limits
        if self.flow.read_paused:  # we stopped reading (the app is busy): the client cannot be blamed
            self._body_started = self._body_last = now
            self._body_bytes = 0
        elif now - self._body_last >= limits.body_timeout_s:
            return self._drop_slow_body(f"no body byte for {limits.body_timeout_s:g} s (CLIPSHOT_BODY_TIMEOUT_S)")
        elif (elapsed := now - self._body_started) >= limits.body_timeout_s and \
                self._body_bytes < limits.min_body_rate * elapsed:
            return self._drop_slow_body(f"the body arrives at {self._body_bytes / elapsed:.0f} bytes/s, under "
                                        f"{limits.min_body_rate} bytes/s (CLIPSHOT_MIN_BODY_RATE)")
        self._body_timer = self.loop.call_later(_CHECK_EVERY_S, self._check_body)

    def _drop_slow_body(self, why: str) -> None:
        log.warning("connection from %s dropped: %s", self.client, why)
        cycle = self.cycle
        if cycle is not None and cycle.response_started:
            self.transport.close()
        else:
            self._refuse(408, "Request Timeout", "body_timeout", f"The request body is too slow: {why}.")
        if cycle is not None:  # wake the app's receive() with http.disconnect
            cycle.disconnected = True
            cycle.message_event.set()

    def _refuse(self, status: int, reason: str, code: str, message: str,
                extra: dict[str, str] | None = None) -> None:
        self._refused = True
        self._cancel_timers()
        self.parked.pop(self, None)
        if not self.transport.is_closing():
            self.transport.write(raw_error(status, reason, code, message, extra))
            self.transport.close()

    def _cancel_timers(self) -> None:
        self._cancel(self._header_timer)
        self._cancel(self._body_timer)
        self._header_timer = self._body_timer = None

    @staticmethod
    def _cancel(timer: asyncio.TimerHandle | None) -> None:
        if timer is not None:
            timer.cancel()


def guarded_protocol(settings: Settings) -> type[GuardedHttpToolsProtocol]:
    """A protocol class bound to the settings' limits, to pass as ``uvicorn.Config(http=...)``."""
    limits = ConnectionLimits(max_header_bytes=settings.max_header_bytes, header_timeout_s=settings.header_timeout_s,
                              body_timeout_s=settings.body_timeout_s, min_body_rate=settings.min_body_rate,
                              max_connections=settings.max_connections,
                              probe_connections=settings.probe_connections)
    return type("ClipshotHttpProtocol", (GuardedHttpToolsProtocol,), {"limits": limits, "parked": {}})
