"""The audit log: who changed which product, when, and from which version to which.

Written synchronously (unlike inspections): admin changes are rare, and an audit trail that may silently drop an
event is no audit trail. A failed write is logged as an error but does not undo or fail the change itself, which
has already happened when the event is written. Keys appear by name only (``app.core.key_names``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from app.jobs.job_db import JobDatabase
from app.records.pages import Where, now_text, page

_ORDER = " ORDER BY time DESC, id DESC"


@dataclass(frozen=True)
class AuditFilter:
    """What a listing keeps; None = no condition. Times are in the stored text format."""

    category: str | None = None
    action: str | None = None
    key_name: str | None = None
    since: str | None = None
    until: str | None = None

    def where(self) -> Where:
        where = Where()
        where.add_if(self.category, "category = ?")
        where.add_if(self.action, "action = ?")
        where.add_if(self.key_name, "key_name = ?")
        where.add_if(self.since, "time >= ?")
        where.add_if(self.until, "time < ?")
        return where


class AuditLog:
    """Append and read ``audit_events`` (thread-safe: each call is one transaction)."""

    def __init__(self, db: JobDatabase) -> None:
        self.db = db

    def append(self, *, key_name: str, scope: str, action: str, category: str | None, before_version: int | None,
               after_version: int | None, detail: dict[str, Any] | None = None,
               request_id: str | None = None) -> None:
        with self.db.tx() as tx:
            tx.run("INSERT INTO audit_events (time, key_name, scope, action, category, before_version, "
                   "after_version, detail, request_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                   (now_text(), key_name, scope, action, category, before_version, after_version,
                    json.dumps(detail, separators=(",", ":")) if detail else None, request_id))

    def list(self, filters: AuditFilter, *, cursor: str | None = None,
             limit: int = 100) -> tuple[list[dict[str, Any]], str | None]:
        """Newest first; ``(events, next_cursor)``, ``next_cursor`` None on the last page."""
        where = filters.where()
        where.after(cursor)
        with self.db.tx() as tx:
            rows = tx.all(f"SELECT * FROM audit_events{where.sql()}{_ORDER} LIMIT ?", (*where.args, limit + 1))
        for row in rows:
            row["detail"] = json.loads(row["detail"]) if row["detail"] else None
        return page(rows, limit)
