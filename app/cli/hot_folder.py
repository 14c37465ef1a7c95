"""The hot folder behind ``clipshot watch``: inspect images as cameras drop them, once each, never half-written.

When is a file complete? A camera, FTP or SMB server writes it in pieces, sometimes pausing between them.
A file is read only once it stayed unchanged (size and mtime) for ``settle_s`` *and* no process holds it open
for writing: on Linux a refused read lease says exactly that (``_being_written``), even for a writer that
started before the watch did. Where leases cannot tell (another owner, network file systems), inotify's
close-after-write event stands in: a file some writer modified waits for that writer's close, or for
``stale_s`` unchanged if it never closes it; a file no event was seen for needs the quiet period alone. Files starting
with ``.`` or ending in ``.tmp``/``.part``/``~`` (upload temporaries) and non-images are left alone.

Exactly once across restarts: a ledger (SQLite, ``DIR/.clipshot/ledger.sqlite3``) records each file's name,
SHA-256 and result *before* the file is moved to ``done/`` or ``failed/`` (with a JSON sidecar next to it).
After a crash between the two, the restart finds the file in the ledger and only finishes the move; the
same bytes under the same name are never inspected twice. Only an image the service rejects (corrupt,
too large, ...) goes to ``failed/``; an unreachable or overloaded service leaves the file where it is and
it is retried, because that is not the image's fault.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from app.cli.predict import IMAGE_SUFFIXES

log = logging.getLogger(__name__)
STATE_DIR, DONE_DIR, FAILED_DIR = ".clipshot", "done", "failed"
TEMP_SUFFIXES = (".tmp", ".part", ".filepart", ".partial", "~")
RETRY_S = 2.0  # after the service was unreachable or busy: how long a file waits before the next try

# inspect(path, data) -> the sidecar's fields; raises ImageRejected for an image the service refused, anything
# else when it could not be asked (outage: the file stays and is retried)
Inspector = Callable[[Path, bytes], dict[str, Any]]


class ImageRejected(Exception):
    """The service refused this image itself (it goes to ``failed/``), as opposed to being unreachable."""


class TryLater(Exception):
    """The service could not be asked now (unreachable, overloaded): the file stays and is tried again."""


@dataclass
class _Candidate:
    stat: tuple[int, int]  # size, mtime_ns when last looked at
    changed: float  # monotonic time of the last change seen (event or stat)
    open_write: bool  # a writer modified it and has not closed it yet
    not_before: float = 0.0  # retry back-off after an outage
    seen: float = field(default_factory=time.monotonic)


class Ledger:
    """Which (name, SHA-256) pairs were inspected, with their sidecar: the restart-proof memory of the folder."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("CREATE TABLE IF NOT EXISTS inspected (name TEXT NOT NULL, sha256 TEXT NOT NULL, "
                           "outcome TEXT NOT NULL, sidecar TEXT NOT NULL, at TEXT NOT NULL, "
                           "PRIMARY KEY (name, sha256))")

    def get(self, name: str, sha256: str) -> tuple[str, dict[str, Any]] | None:
        row = self._conn.execute("SELECT outcome, sidecar FROM inspected WHERE name = ? AND sha256 = ?",
                                 (name, sha256)).fetchone()
        return None if row is None else (row[0], json.loads(row[1]))

    def record(self, name: str, sha256: str, outcome: str, sidecar: dict[str, Any]) -> None:
        self._conn.execute("INSERT OR REPLACE INTO inspected VALUES (?, ?, ?, ?, ?)",
                           (name, sha256, outcome, json.dumps(sidecar), sidecar["processed_at"]))

    def count(self) -> int:
        return int(self._conn.execute("SELECT COUNT(*) FROM inspected").fetchone()[0])

    def close(self) -> None:
        self._conn.close()


def _wanted(path: Path) -> bool:
    name = path.name
    return (not name.startswith(".") and not name.endswith(TEMP_SUFFIXES)
            and path.suffix.lower() in IMAGE_SUFFIXES)


def _stat(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _being_written(path: Path) -> bool | None:
    """Whether some process holds ``path`` open for writing, or None where that cannot be told.

    Linux refuses a read lease on a file that any process has open for writing; that is exact, and sees a
    writer that opened the file before the watch started (no inotify event tells of it). It needs the watch
    to own the file (or CAP_LEASE) and a local file system; elsewhere the close event and quiet period decide.
    """
    if not hasattr(fcntl, "F_SETLEASE"):
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError as exc:
        return True if exc.errno in (errno.EAGAIN, errno.EBUSY) else None
    else:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        return False
    finally:
        os.close(fd)


def _write_json_atomically(target: Path, body: dict[str, Any]) -> None:
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(json.dumps(body, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, target)


class HotFolder:
    """Watches ``folder`` (not its subfolders) and hands each complete image to ``inspect`` once."""

    def __init__(self, folder: Path, inspect: Inspector, *, settle_s: float = 0.5, stale_s: float = 60.0) -> None:
        self.folder = folder.resolve()
        self.inspect = inspect
        self.settle_s, self.stale_s = settle_s, stale_s
        self.done, self.failed = self.folder / DONE_DIR, self.folder / FAILED_DIR
        for sub in (self.done, self.failed):
            sub.mkdir(exist_ok=True)
        probe = self.folder / STATE_DIR / ".write-test"
        probe.parent.mkdir(exist_ok=True)
        probe.write_bytes(b"")  # unwritable folder: fail now, naming it, not at the first image
        probe.unlink()
        self.ledger = Ledger(self.folder / STATE_DIR / "ledger.sqlite3")
        self._candidates: dict[Path, _Candidate] = {}
        self._lock = threading.Lock()
        self._observer: Any = None
        self.processed = 0

    # -- events ----------------------------------------------------------------------------------
    def start(self) -> None:
        """Begin watching; files already in the folder are candidates too (a backlog from a restart)."""
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer

        hot = self

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event: Any) -> None:
                if event.is_directory:
                    return
                kind = event.event_type
                if kind == "moved":  # renamed into place (upload-then-rename): complete at once
                    hot._touch(Path(event.dest_path), open_write=False)
                elif kind in ("created", "modified"):
                    hot._touch(Path(event.src_path), open_write=True)
                elif kind == "closed":
                    hot._touch(Path(event.src_path), open_write=False)

        self._observer = Observer()
        self._observer.schedule(Handler(), str(self.folder), recursive=False)
        self._observer.start()
        for path in sorted(self.folder.iterdir()):
            if path.is_file():
                self._touch(path, open_write=None)

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=10)
        self.ledger.close()

    def _touch(self, path: Path, open_write: bool | None) -> None:
        if path.parent != self.folder or not _wanted(path):
            return
        with self._lock:
            current = self._candidates.get(path)
            stat = _stat(path) or (-1, -1)
            if current is None:
                self._candidates[path] = _Candidate(stat, time.monotonic(), bool(open_write))
            else:
                current.changed = time.monotonic()
                current.stat = stat
                if open_write is not None:
                    current.open_write = open_write

    # -- the work loop ---------------------------------------------------------------------------
    def ready(self) -> list[Path]:
        """Candidates that are complete now, oldest first."""
        now, found = time.monotonic(), []
        with self._lock:
            for path, cand in list(self._candidates.items()):
                stat = _stat(path)
                if stat is None:  # gone (deleted or moved away by someone else)
                    del self._candidates[path]
                    continue
                if stat != cand.stat:
                    cand.stat, cand.changed = stat, now
                    continue
                quiet = now - cand.changed
                if now < cand.not_before or quiet < self.settle_s:
                    continue
                writing = _being_written(path)
                if writing is True:
                    cand.open_write = True
                elif writing is False or quiet >= (self.stale_s if cand.open_write else self.settle_s):
                    found.append((cand.seen, path))
        return [path for _, path in sorted(found)]

    def run_once(self) -> int:
        """Inspect every file complete now; returns how many were finished (moved)."""
        finished = 0
        for path in self.ready():
            try:
                finished += self._process(path)
            except (TryLater, OSError) as exc:  # service outage, or the file vanished: leave it, look again
                log.warning("%s: not inspected (%s); retrying in %.0f s", path.name, exc, RETRY_S)
                with self._lock:
                    if path in self._candidates:
                        self._candidates[path].not_before = time.monotonic() + RETRY_S
        return finished

    def pending(self) -> int:
        with self._lock:
            return len(self._candidates)

    def _process(self, path: Path) -> int:
        data = path.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        known = self.ledger.get(path.name, sha)
        if known is not None:  # inspected before a crash or restart: finish the move only
            outcome, sidecar = known
        else:
            outcome = "done"
            try:
                sidecar = self.inspect(path, data)
            except ImageRejected as exc:
                outcome, sidecar = "failed", {"error": str(exc)}
            sidecar = {"file": path.name, "sha256": sha, **sidecar, "outcome": outcome,
                       "processed_at": datetime.now(UTC).isoformat(timespec="milliseconds")}
            self.ledger.record(path.name, sha, outcome, sidecar)
        self._move(path, outcome, sidecar, sha)
        with self._lock:
            self._candidates.pop(path, None)
        self.processed += 1
        return 1

    def _move(self, path: Path, outcome: str, sidecar: dict[str, Any], sha: str) -> None:
        """Sidecar first, then the image (both atomic renames): an image in done/ always has its sidecar."""
        target_dir = self.done if outcome == "done" else self.failed
        target = target_dir / path.name
        if target.exists() and _sha_of(target) != sha:  # a camera that reuses names: keep both
            target = target_dir / f"{path.stem}-{sha[:12]}{path.suffix}"
        _write_json_atomically(target.with_name(target.name + ".json"), sidecar)
        os.replace(path, target)
        log.info("%s -> %s/%s", path.name, target_dir.name, target.name)


def _sha_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
