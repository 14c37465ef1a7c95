"""The inspection rows and their image files: insert, list with filters, delete by age, and retention.

Rows and files change together here, so the two never disagree for long: a deletion removes the rows in one
transaction and then the files those rows named (a crash in between leaves unreferenced files, never a row
that points at a missing one it claims to have). Paths are stored relative to the image folder, so the folder
can be moved with its database.
"""

from __future__ import annotations

import builtins
import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.jobs.job_db import JobDatabase
from app.records.pages import MAX_PAGE, Where, page

log = logging.getLogger(__name__)
COLUMNS = ("time", "category", "version", "score", "score_normalized", "verdict", "threshold", "map_threshold",
           "request_id", "part_id", "line", "camera", "filename", "sha256", "image_path", "overlay_path",
           "image_bytes", "replica", "p_value", "good_p_value", "defect_p_value", "defect_evidence")
_INSERT = f"INSERT INTO inspections ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
_ORDER = " ORDER BY time DESC, id DESC"
_DELETE_CHUNK = 500  # rows per DELETE ... IN (...): well under SQLite's and PostgreSQL's parameter limits


@dataclass(frozen=True)
class InspectionFilter:
    """What a listing keeps; None = no condition. Times are in the stored text format (``pages.time_text``)."""

    verdict: str | None = None
    since: str | None = None
    until: str | None = None
    part_id: str | None = None
    line: str | None = None
    camera: str | None = None
    version: int | None = None
    min_score: float | None = None
    max_score: float | None = None
    min_p_value: float | None = None

    def where(self, category: str) -> Where:
        where = Where()
        where.add("category = ?", category)
        where.add_if(self.verdict, "verdict = ?")
        where.add_if(self.since, "time >= ?")
        where.add_if(self.until, "time < ?")
        where.add_if(self.part_id, "part_id = ?")
        where.add_if(self.line, "line = ?")
        where.add_if(self.camera, "camera = ?")
        where.add_if(self.version, "version = ?")
        where.add_if(self.min_score, "score >= ?")
        where.add_if(self.max_score, "score <= ?")
        where.add_if(self.min_p_value, "p_value >= ?")
        return where


class InspectionStore:
    """Thread-safe access to the ``inspections`` table and the image folder (``image_dir``)."""

    def __init__(self, db: JobDatabase, image_dir: Path) -> None:
        self.db = db
        self.image_dir = image_dir

    def insert(self, rows: list[dict[str, Any]]) -> None:
        """Add rows (dicts with ``COLUMNS``) in one transaction."""
        with self.db.tx() as tx:
            for row in rows:
                tx.run(_INSERT, tuple(row.get(c) for c in COLUMNS))

    def list(self, category: str, filters: InspectionFilter, *, cursor: str | None = None,
             limit: int = 100) -> tuple[list[dict[str, Any]], str | None]:
        """Newest first; ``(rows, next_cursor)`` where ``next_cursor`` is None on the last page."""
        where = filters.where(category)
        where.after(cursor)
        with self.db.tx() as tx:
            rows = tx.all(f"SELECT * FROM inspections{where.sql()}{_ORDER} LIMIT ?", (*where.args, limit + 1))
        return page(rows, limit)

    def iter_all(self, category: str, filters: InspectionFilter) -> Iterator[dict[str, Any]]:
        """Every matching row, newest first, read a page at a time (for exports of any length)."""
        cursor: str | None = None
        while True:
            rows, cursor = self.list(category, filters, cursor=cursor, limit=MAX_PAGE)
            yield from rows
            if cursor is None:
                return

    def recent_scores(self, category: str, versions: builtins.list[int], limit: int) -> builtins.list[float]:
        """Scores of the newest ``limit`` inspections made by any of ``versions``, newest first (a histogram's
        worth: the (category, time) index is walked newest first and the walk stops at ``limit`` matches)."""
        if not versions or limit <= 0:
            return []
        marks = ", ".join("?" * len(versions))
        with self.db.tx() as tx:
            rows = tx.all(f"SELECT score FROM inspections WHERE category = ? AND version IN ({marks}){_ORDER} "
                          "LIMIT ?", (category, *versions, limit))
        return [float(r["score"]) for r in rows]

    def kept_file(self, category: str, inspection_id: int, column: str) -> Path | None:
        """The kept ``image_path`` or ``overlay_path`` file of one of ``category``'s inspections, or None when the
        row, the kept picture or its file is gone (retention may have removed the file and cleared the path)."""
        if column not in ("image_path", "overlay_path"):
            raise ValueError(f"not an image column: {column}")
        with self.db.tx() as tx:
            row = tx.one(f"SELECT {column} FROM inspections WHERE category = ? AND id = ?", (category, inspection_id))
        name = row and row[column]
        if not name:
            return None
        path = (self.image_dir / name).resolve()
        # The stored path is the writer's own, relative; refuse anything that would leave the image folder anyway.
        if not path.is_relative_to(self.image_dir.resolve()) or not path.is_file():
            return None
        return path

    def delete_before(self, category: str, before: str) -> int:
        """Delete one product's inspections older than ``before`` with their images; how many rows went."""
        return self._delete("category = ? AND time < ?", (category, before))

    def expire(self, cutoff: str) -> int:
        """Retention by age: every product's inspections older than ``cutoff``."""
        return self._delete("time < ?", (cutoff,))

    def trim_count(self, max_count: int) -> int:
        """Retention by count: keep each product's newest ``max_count`` inspections."""
        deleted = 0
        with self.db.tx() as tx:
            over = tx.all("SELECT category FROM inspections GROUP BY category HAVING COUNT(*) > ?", (max_count,))
        for row in over:
            with self.db.tx() as tx:
                edge = tx.one(f"SELECT time, id FROM inspections WHERE category = ?{_ORDER} LIMIT 1 OFFSET ?",
                              (row["category"], max_count - 1))
            if edge is not None:
                deleted += self._delete("category = ? AND (time < ? OR (time = ? AND id < ?))",
                                        (row["category"], edge["time"], edge["time"], edge["id"]))
        return deleted

    def image_bytes(self) -> int:
        """Bytes of every kept image, as recorded when they were written."""
        with self.db.tx() as tx:
            row = tx.one("SELECT COALESCE(SUM(image_bytes), 0) AS total FROM inspections")
        return int(row["total"]) if row else 0

    def trim_bytes(self, max_bytes: int) -> int:
        """Retention by bytes: drop the oldest images (rows stay, without images) until at most ``max_bytes``."""
        excess = self.image_bytes() - max_bytes
        freed = 0
        while excess > 0:
            with self.db.tx() as tx:
                rows = tx.all("SELECT id, image_path, overlay_path, image_bytes FROM inspections "
                              "WHERE image_bytes > 0 ORDER BY time, id LIMIT ?", (_DELETE_CHUNK,))
                if not rows:
                    break
                chosen = []
                for row in rows:
                    chosen.append(row)
                    excess -= row["image_bytes"]
                    if excess <= 0:
                        break
                marks = ", ".join("?" * len(chosen))
                tx.run(f"UPDATE inspections SET image_path = NULL, overlay_path = NULL, image_bytes = 0 "
                       f"WHERE id IN ({marks})", tuple(r["id"] for r in chosen))
            self._unlink(chosen)
            freed += sum(r["image_bytes"] for r in chosen)
        return freed

    def _delete(self, condition: str, args: tuple[Any, ...]) -> int:
        deleted = 0
        while True:
            with self.db.tx() as tx:
                rows = tx.all(f"SELECT id, image_path, overlay_path FROM inspections WHERE {condition} LIMIT ?",
                              (*args, _DELETE_CHUNK))
                if rows:
                    marks = ", ".join("?" * len(rows))
                    tx.run(f"DELETE FROM inspections WHERE id IN ({marks})", tuple(r["id"] for r in rows))
            if not rows:
                return deleted
            self._unlink(rows)
            deleted += len(rows)

    def _unlink(self, rows: builtins.list[dict[str, Any]]) -> None:  # `list` here is the method above
        for row in rows:
            for name in (row.get("image_path"), row.get("overlay_path")):
                if name:
                    with contextlib.suppress(FileNotFoundError):
                        (self.image_dir / name).unlink()
