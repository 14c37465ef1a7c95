"""Time stamps and cursor pages shared by the inspection record and the audit log.

Why keyset pagination on ``(time, id)`` instead of offsets: rows keep arriving while a client walks the pages,
and an offset would then repeat or skip rows; "older than the last row I saw" stays right whatever is inserted
above it. Times are stored as fixed-width UTC text (``2024-05-01T12:00:00.000000Z``), so text order is time
order in both SQLite and PostgreSQL, and the id breaks ties between rows of the same microsecond.
The cursor is opaque to clients (URL-safe base64 of the last row's time and id).
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from app.errors import BadRequestError

TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"
MAX_PAGE = 1000


def now_text() -> str:
    """The current UTC time in the stored format."""
    return datetime.now(UTC).strftime(TIME_FORMAT)


def time_text(moment: datetime) -> str:
    """``moment`` in the stored format (a time without a zone is taken as UTC)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime(TIME_FORMAT)


def encode_cursor(row: dict[str, Any]) -> str:
    """The cursor that continues after ``row``."""
    return base64.urlsafe_b64encode(json.dumps([row["time"], row["id"]]).encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[str, int]:
    """``(time, id)`` of a cursor made by ``encode_cursor``; 400 ``invalid_cursor`` for anything else."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        moment, row_id = json.loads(raw)
        datetime.strptime(moment, TIME_FORMAT)
        if not isinstance(row_id, int) or isinstance(row_id, bool):
            raise ValueError("id")
    except (binascii.Error, ValueError, TypeError, UnicodeDecodeError):
        raise BadRequestError("`cursor` is not a cursor this server gave out; start again without it.",
                              code="invalid_cursor") from None
    return moment, row_id


@dataclass
class Where:
    """A conjunction of SQL conditions with their arguments (``?`` placeholders, both dialects)."""

    terms: list[str] = field(default_factory=list)
    args: list[Any] = field(default_factory=list)

    def add(self, term: str, *args: Any) -> None:
        self.terms.append(term)
        self.args.extend(args)

    def add_if(self, value: Any, term: str) -> None:
        """Add ``term`` with ``value`` as its argument, unless ``value`` is None."""
        if value is not None:
            self.add(term, value)

    def after(self, cursor: str | None) -> None:
        """Rows older than the cursor's row, in the (time DESC, id DESC) order of every listing."""
        if cursor:
            moment, row_id = decode_cursor(cursor)
            self.add("(time < ? OR (time = ? AND id < ?))", moment, moment, row_id)

    def sql(self) -> str:
        return " WHERE " + " AND ".join(self.terms) if self.terms else ""


def page(rows: list[dict[str, Any]], limit: int) -> tuple[list[dict[str, Any]], str | None]:
    """The first ``limit`` of ``rows`` (fetched with ``limit + 1``) and the cursor to the next page, if any."""
    if len(rows) > limit:
        return rows[:limit], encode_cursor(rows[limit - 1])
    return rows, None
