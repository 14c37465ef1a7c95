"""Settings of the HTTP server itself: where ``clipshot serve`` listens, how it logs, and how it protects itself.

One group of the one ``Settings`` object (inherited, read from ``CLIPSHOT_*`` like every other setting): the
limits uvicorn and ``app/http_guard.py`` enforce before a request reaches the application — header size and
time, body pauses and rate, keep-alive, the connection cap and the probes' reserve beyond it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

MiB = 1024 * 1024


class ServerSettings(BaseModel):
    """Bind address, log format and the connection-level limits of ``clipshot serve``."""

    host: str = Field("127.0.0.1", min_length=1, description="Interface `clipshot serve` binds to.")
    port: int = Field(8000, ge=1, le=65535, description="TCP port `clipshot serve` listens on.")
    log_format: Literal["text", "json"] = Field(
        "text",
        description="Log lines of `clipshot serve` (and the other commands): `text` or `json` (one object per "
        "line with time, level, logger, message and request_id).",
    )

    max_header_bytes: int = Field(
        32 * 1024,
        ge=1024,
        le=MiB,
        description="Largest request line plus headers (bytes); beyond it `clipshot serve` answers 431 and "
        "closes the connection before parsing more.",
    )
    header_timeout_s: float = Field(
        10.0,
        gt=0,
        le=3600,
        description="Time a client has from connecting (or from a request's first byte) to the end of its "
        "headers (s); then 408 and the connection is closed.",
    )
    body_timeout_s: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="Longest pause while a request body arrives (s); also the grace period after which the "
        "body must average `min_body_rate`. A slower client gets 408 and is disconnected.",
    )
    min_body_rate: int = Field(
        1024,
        ge=0,
        description="Slowest accepted average upload rate (bytes/s) once a body has taken `body_timeout_s`; "
        "0 disables the rate check (the pause limit stays).",
    )
    keep_alive_timeout_s: int = Field(
        5, ge=1, le=3600, description="How long an idle keep-alive connection stays open between requests (s)."
    )
    max_connections: int = Field(
        1024,
        ge=1,
        le=1_000_000,
        description="Most open HTTP connections; one more is answered 503 + Retry-After and closed, unless it is "
        "a `/healthz` or `/readyz` probe that fits in `probe_connections`.",
    )
    probe_connections: int = Field(
        8, ge=0, le=1024,
        description="Connections allowed beyond `max_connections` for one `/healthz` or `/readyz` request each, so "
        "a full server still answers its orchestrator's probes. Such a connection must send its request at once; "
        "while all are taken a new one replaces the oldest that has not yet sent a probe request line.",
    )

    @field_validator("log_format", mode="before")
    @classmethod
    def _normalise_log_format(cls, v: Any) -> Any:
        return v.strip().lower() if isinstance(v, str) else v
