"""Logging for the service and the CLI: one stderr handler on the root logger, text or JSON lines.

Why here and not in uvicorn's config: uvicorn's dictConfig gives its loggers their own handlers and
format, so its access lines never showed the request id and ``--log-level`` reached only part of the
output. ``clipshot serve`` starts uvicorn with ``log_config=None``; every logger (uvicorn's included)
then propagates to the one handler installed here, whose filter stamps the current request id.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import UTC, datetime

LOG_FORMATS = ("text", "json")
LOG_FORMAT_ENV = "CLIPSHOT_LOG_FORMAT"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"
CLI_FORMAT = "%(levelname)s %(message)s"  # train / eval / info: no requests, no timestamps needed
_HANDLER_NAME = "clipshot"


class LogFormatError(ValueError):
    """``CLIPSHOT_LOG_FORMAT`` names no known format."""


class JsonFormatter(logging.Formatter):
    """One JSON object per line: what log shippers (Loki, Elastic, CloudWatch) parse without a grok rule."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class OpenClipRootFilter(logging.Filter):
    """open_clip logs through the *root* logger (so its name cannot be levelled); drop those records unless
    debugging: its INFO lines are chatter, and its ERROR on a failed weight download is repeated, with what
    to do, in the one-line error the backbone loader raises."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name == "root" and f"{os.sep}open_clip{os.sep}" in record.pathname)


class _NoRequestId(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = "-"
        return True


def log_format_from_env() -> str:
    """``CLIPSHOT_LOG_FORMAT`` for commands that build no ``Settings`` (train, eval, info)."""
    value = os.environ.get(LOG_FORMAT_ENV, "text").strip().lower() or "text"
    if value not in LOG_FORMATS:
        raise LogFormatError(f"{LOG_FORMAT_ENV}={value!r}: must be one of {', '.join(LOG_FORMATS)}")
    return value


def configure_logging(level: str, fmt: str = "text", *, request_ids: bool = True) -> None:
    """Replace our root handler (idempotent: calling it again switches level/format, never duplicates lines)."""
    if fmt not in LOG_FORMATS:
        raise LogFormatError(f"log format must be one of {', '.join(LOG_FORMATS)}, got {fmt!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(_HANDLER_NAME)
    if request_ids:
        from app.api.request_id import RequestIdLogFilter  # starlette: only the server needs it

        handler.addFilter(RequestIdLogFilter())
    else:
        handler.addFilter(_NoRequestId())
    if level.lower() != "debug":
        handler.addFilter(OpenClipRootFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT if request_ids else CLI_FORMAT))
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.captureWarnings(True)  # warnings.warn (e.g. precision on CPU) become log lines in the same format
