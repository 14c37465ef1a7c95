"""A bounded, on-disk FIFO of messages waiting for the broker: results survive a broker outage and a restart.

Why SQLite and not memory: a line keeps inspecting while the broker (or the network to it) is down, and the
service may be restarted meanwhile; every verdict must still reach the MES once the broker is back, in the
order it was made. Rows are deleted only after the broker acknowledged them (QoS 1 PUBACK), so a crash
between send and ack re-sends the message on the next start; consumers de-duplicate on ``message_id``.
When the outbox is full the *oldest* rows are dropped (the newest verdicts matter most to a running line),
and the caller counts them. One connection, shared by the request threads that add rows and the sender that
removes them, under a lock (each operation is one short statement or transaction).
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

OUTBOX_FILENAME = "mqtt-outbox.sqlite3"
MAX_OUTBOXES = 64  # one per process sharing a folder (replicas on one store); more is a misconfiguration


class OutboxError(RuntimeError):
    """The outbox file cannot be opened or written (unwritable folder, full disk, not a database)."""


@dataclass(frozen=True)
class OutboxMessage:
    """One message as queued: ``seq`` orders the queue, ``message_id`` is what consumers de-duplicate on."""

    seq: int
    message_id: str
    topic: str
    payload: bytes
    retain: bool


class Outbox:
    """Oldest-first queue in ``path``; ``put`` trims to ``max_messages`` and returns how many it dropped."""

    def __init__(self, path: Path, max_messages: int, lock_fd: int | None = None, slot: int = 0) -> None:
        if max_messages < 1:
            raise ValueError("max_messages must be at least 1")
        self.path = Path(path)
        self.max_messages = max_messages
        self.slot = slot  # which of a folder's outboxes (0: mqtt-outbox.sqlite3, n: mqtt-outbox-n.sqlite3)
        self._lock_fd = lock_fd
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across a process crash
            self._conn.execute(
                "CREATE TABLE IF NOT EXISTS outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, message_id TEXT NOT NULL,"
                " topic TEXT NOT NULL, payload BLOB NOT NULL, retain INTEGER NOT NULL)")
            self._rows = int(self._conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
        except (OSError, sqlite3.Error) as exc:
            if lock_fd is not None:
                os.close(lock_fd)
            raise OutboxError(f"cannot open the MQTT outbox {self.path}: {exc}") from exc

    def put(self, messages: list[tuple[str, str, bytes, bool]]) -> int:
        """Append ``(message_id, topic, payload, retain)`` rows in one transaction; returns the rows dropped."""
        if not messages:
            return 0
        with self._lock, self._conn:
            self._conn.execute("BEGIN IMMEDIATE")
            self._conn.executemany("INSERT INTO outbox (message_id, topic, payload, retain) VALUES (?, ?, ?, ?)",
                                   [(m, t, p, int(r)) for m, t, p, r in messages])
            excess = self._rows + len(messages) - self.max_messages
            if excess > 0:
                self._conn.execute("DELETE FROM outbox WHERE seq IN (SELECT seq FROM outbox ORDER BY seq LIMIT ?)",
                                   (excess,))
            self._rows = min(self._rows + len(messages), self.max_messages)
        return max(0, excess)

    def after(self, seq: int, limit: int) -> list[OutboxMessage]:
        """Up to ``limit`` messages queued after ``seq``, oldest first."""
        with self._lock:
            rows = self._conn.execute("SELECT seq, message_id, topic, payload, retain FROM outbox WHERE seq > ? "
                                      "ORDER BY seq LIMIT ?", (seq, limit)).fetchall()
        return [OutboxMessage(s, m, t, bytes(p), bool(r)) for s, m, t, p, r in rows]

    def remove(self, seqs: list[int]) -> None:
        """Forget acknowledged messages (a seq already dropped for space is ignored)."""
        if seqs:
            with self._lock:
                before = self._conn.total_changes
                self._conn.executemany("DELETE FROM outbox WHERE seq = ?", [(s,) for s in seqs])
                self._rows -= self._conn.total_changes - before

    def depth(self) -> int:
        """Rows waiting (counted once at open, then kept up to date: no table scan per message)."""
        return self._rows

    def close(self) -> None:
        with self._lock:
            self._conn.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the claim
            self._lock_fd = None

    @classmethod
    def claim(cls, folder: Path, max_messages: int) -> Outbox:
        """The first outbox in ``folder`` no live process holds (``mqtt-outbox.sqlite3``, ``mqtt-outbox-1…``).

        Several replicas may share one store: each sends from an outbox of its own (two senders on one file would
        race on its rows), held by an ``flock`` that dies with the process. A restarted process claims a free one,
        so the results a dead process left behind are sent by whichever process comes up next.
        """
        try:
            folder.mkdir(parents=True, exist_ok=True)
            for n in range(MAX_OUTBOXES):
                path = folder / (OUTBOX_FILENAME if n == 0 else OUTBOX_FILENAME.replace(".", f"-{n}.", 1))
                fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    continue
                return cls(path, max_messages, lock_fd=fd, slot=n)
        except OSError as exc:
            raise OutboxError(f"cannot open an MQTT outbox in {folder}: {exc}") from exc
        raise OutboxError(f"all {MAX_OUTBOXES} MQTT outboxes in {folder} are held by other processes")
