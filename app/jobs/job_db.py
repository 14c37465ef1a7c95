"""Where job records live: a SQLite file in the store (the embedded default) or PostgreSQL (``CLIPSHOT_JOB_DB``).

Why two: one process needs no database server, so SQLite stays the default; several replicas or fine-tune
workers need one shared, concurrent database, and PostgreSQL gives row locks (``FOR UPDATE SKIP LOCKED``) so a
queued job is claimed by exactly one worker. ``JobStore`` writes one SQL text for both (``?`` placeholders);
each class here supplies the connection, the transaction and the few words in which the dialects differ.
The inspection record (``app.records.record_db``) opens its own tables through the same two classes, with its
own ``schema`` callback, so there is one connection layer for every table the service keeps.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol, get_args
from urllib.parse import urlsplit, urlunsplit

from app.jobs.job_model import JobKind, JobState

DB_FILENAME = "jobs.sqlite3"
POSTGRES_SCHEMES = ("postgresql", "postgres")
CONNECT_TIMEOUT_S = 5
_SCHEMA_LOCK_ID = 0x636C6970  # pg_advisory_xact_lock key: two replicas starting at once create the table once
_STATES = ", ".join(repr(s.value) for s in JobState)
_KIND_CHECK = f"CHECK (kind IN ({', '.join(repr(k) for k in get_args(JobKind))}))"
_COLUMNS = f"""
    id TEXT PRIMARY KEY,
    category TEXT NOT NULL,
    kind TEXT NOT NULL {_KIND_CHECK},
    state TEXT NOT NULL CHECK (state IN ({_STATES})),
    progress {{real}} NOT NULL DEFAULT 0 CHECK (progress >= 0 AND progress <= 1),
    stage TEXT,
    step INTEGER,
    total_steps INTEGER,
    message TEXT,
    params TEXT NOT NULL DEFAULT '{{{{}}}}',
    metrics TEXT,
    error TEXT,
    result_version INTEGER,
    result TEXT,
    worker TEXT,
    heartbeat_at TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL,
    started_at TEXT,
    finished_at TEXT"""
_INDEXES = [
    "CREATE INDEX IF NOT EXISTS jobs_by_created ON jobs (created_at DESC)",
    "CREATE INDEX IF NOT EXISTS jobs_by_category ON jobs (category, created_at DESC)",
    # one active fine-tune per category; refits (register, feedback) queue on the category's lock instead
    "DROP INDEX IF EXISTS jobs_one_active_per_category",
    "CREATE UNIQUE INDEX IF NOT EXISTS jobs_one_active_finetune ON jobs (category) "
    "WHERE kind = 'finetune' AND state IN ('queued', 'running')",
]
# Columns added after the first release: older job tables get them on open (ALTER TABLE ADD COLUMN).
_ADDED_COLUMNS = {"worker": "TEXT", "heartbeat_at": "TEXT", "cancel_requested": "INTEGER NOT NULL DEFAULT 0",
                  "stage": "TEXT", "result": "TEXT"}


class JobDatabaseError(RuntimeError):
    """The job database cannot be opened; the message is one line saying what to fix."""


class Tx(Protocol):
    """The three calls ``JobStore`` makes inside a transaction (rows come back as dicts)."""

    def all(self, sql: str, args: tuple[Any, ...] = ()) -> list[dict[str, Any]]: ...
    def one(self, sql: str, args: tuple[Any, ...] = ()) -> dict[str, Any] | None: ...
    def run(self, sql: str, args: tuple[Any, ...] = ()) -> int: ...


class JobDatabase(Protocol):
    """What differs between the backends; everything else is ``JobStore``'s shared SQL."""

    shared: bool  # True when other processes use the same rows (a restart must not fail their jobs)
    order_key: str  # insertion-order tie-breaker for equal created_at
    lock_rows: str  # appended to a SELECT that is followed by an UPDATE of the same rows
    skip_locked: str  # appended to the claim SELECT: concurrent claimers skip each other's row
    integrity_errors: tuple[type[BaseException], ...]
    location: str  # where the rows live, for logs (never contains a password)

    dialect: str  # "sqlite" or "postgresql": for the few DDL words that differ

    def tx(self) -> Any: ...
    def close(self) -> None: ...


# Creates or upgrades a set of tables inside one transaction, called once when a database is opened.
Schema = Callable[[JobDatabase, Tx], None]


def _jobs_schema(db: JobDatabase, tx: Tx) -> None:
    """The ``jobs`` table and its indexes; older tables get the columns and job kinds added since."""
    if db.dialect == "postgresql":
        tx.run("SELECT pg_advisory_xact_lock(?)", (_SCHEMA_LOCK_ID,))
        columns = _COLUMNS.format(real="DOUBLE PRECISION")
        tx.run(f"CREATE TABLE IF NOT EXISTS jobs (seq BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE, {columns})")
        for name, decl in _ADDED_COLUMNS.items():
            tx.run(f"ALTER TABLE jobs ADD COLUMN IF NOT EXISTS {name} {decl}")
        check = tx.one("SELECT pg_get_constraintdef(oid) AS d FROM pg_constraint WHERE conname = 'jobs_kind_check'")
        if check is None or "remove_shot" not in check["d"]:  # a table from before the refit kinds
            tx.run("ALTER TABLE jobs DROP CONSTRAINT IF EXISTS jobs_kind_check")
            tx.run(f"ALTER TABLE jobs ADD CONSTRAINT jobs_kind_check {_KIND_CHECK}")
    else:
        tx.run(f"CREATE TABLE IF NOT EXISTS jobs ({_COLUMNS.format(real='REAL')})")
        table = tx.one("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'jobs'")
        if table is not None and _KIND_CHECK not in table["sql"]:
            _rebuild_sqlite_jobs(tx)  # SQLite cannot alter a CHECK: copy the rows into a table with the new one
        have = {r["name"] for r in tx.all("PRAGMA table_info(jobs)")}
        for name, decl in _ADDED_COLUMNS.items():
            if name not in have:
                tx.run(f"ALTER TABLE jobs ADD COLUMN {name} {decl}")
    for sql in _INDEXES:
        tx.run(sql)


def _rebuild_sqlite_jobs(tx: Tx) -> None:
    """Recreate ``jobs`` with the current columns and checks, keeping every row and its insertion order."""
    tx.run("ALTER TABLE jobs RENAME TO jobs_before_rebuild")
    tx.run(f"CREATE TABLE jobs ({_COLUMNS.format(real='REAL')})")
    old = {r["name"] for r in tx.all("PRAGMA table_info(jobs_before_rebuild)")}
    kept = ", ".join(r["name"] for r in tx.all("PRAGMA table_info(jobs)") if r["name"] in old)
    tx.run(f"INSERT INTO jobs ({kept}) SELECT {kept} FROM jobs_before_rebuild ORDER BY rowid")
    tx.run("DROP TABLE jobs_before_rebuild")


def redact(url: str) -> str:
    """``url`` with its password replaced by ``***``, for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def is_postgres_url(url: str) -> bool:
    """True for ``postgresql://…`` / ``postgres://…``."""
    return urlsplit(url).scheme in POSTGRES_SCHEMES


def open_job_database(store_dir: Path, url: str | None = None, *, filename: str = DB_FILENAME,
                      schema: Schema = _jobs_schema, name: str = "clipshot-jobs") -> JobDatabase:
    """PostgreSQL when ``url`` is given, else ``<store_dir>/<filename>``, with ``schema``'s tables (the jobs
    table by default); raises ``JobDatabaseError``."""
    if url:
        return PostgresJobDatabase(url, schema=schema, name=name)
    return SqliteJobDatabase(Path(store_dir) / filename, schema=schema)


class _SqliteTx:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def all(self, sql: str, args: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        return [dict(r) for r in self.conn.execute(sql, args).fetchall()]

    def one(self, sql: str, args: tuple[Any, ...] = ()) -> dict[str, Any] | None:
        row = self.conn.execute(sql, args).fetchone()
        return dict(row) if row is not None else None

    def run(self, sql: str, args: tuple[Any, ...] = ()) -> int:
        return self.conn.execute(sql, args).rowcount


class SqliteJobDatabase:
    """One connection guarded by a lock serves all threads; WAL lets an operator's ``sqlite3`` shell read along.

    ``BEGIN IMMEDIATE`` takes the database's write lock at the start of every transaction, so a
    read-check-write (a claim, a state transition) is atomic against other threads and processes.
    """

    shared = False
    dialect = "sqlite"
    order_key = "rowid"
    lock_rows = ""
    skip_locked = ""
    integrity_errors: tuple[type[BaseException], ...] = (sqlite3.IntegrityError,)

    def __init__(self, path: Path, *, schema: Schema = _jobs_schema) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.location = str(path)
        self._lock = threading.RLock()
        try:
            # isolation_level=None: we issue BEGIN IMMEDIATE ourselves.
            self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
            self._conn.row_factory = sqlite3.Row
            with self._lock:
                self._conn.execute("PRAGMA journal_mode=WAL")
                self._conn.execute("PRAGMA synchronous=NORMAL")
            with self.tx() as tx:
                schema(self, tx)
        except sqlite3.Error as exc:
            raise JobDatabaseError(f"cannot open the job database {path}: {exc}") from exc

    @contextmanager
    def tx(self) -> Iterator[_SqliteTx]:
        """An exclusive write transaction (also used for reads: they are short)."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield _SqliteTx(self._conn)
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class _PgTx:
    def __init__(self, conn: Any) -> None:
        self.conn = conn

    @staticmethod
    def _sql(sql: str) -> str:
        return sql.replace("?", "%s")  # JobStore's SQL has no literal "?" or "%"

    def all(self, sql: str, args: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        return self.conn.execute(self._sql(sql), args).fetchall()

    def one(self, sql: str, args: tuple[Any, ...] = ()) -> dict[str, Any] | None:
        return self.conn.execute(self._sql(sql), args).fetchone()

    def run(self, sql: str, args: tuple[Any, ...] = ()) -> int:
        return self.conn.execute(self._sql(sql), args).rowcount


class PostgresJobDatabase:
    """A small psycopg 3 connection pool; PostgreSQL's row locks make claims exclusive across machines.

    The pool re-checks a connection before lending it, so a database restart costs the requests in flight,
    not the process.
    """

    shared = True
    dialect = "postgresql"
    order_key = "seq"
    lock_rows = " FOR UPDATE"
    skip_locked = " FOR UPDATE SKIP LOCKED"

    def __init__(self, url: str, *, pool_size: int = 4, schema: Schema = _jobs_schema,
                 name: str = "clipshot-jobs") -> None:
        self.location = redact(url)
        if not is_postgres_url(url):
            raise JobDatabaseError(f"job database URL {self.location!r} is not postgresql://user:pass@host:port/db")
        try:
            import psycopg
            from psycopg.rows import dict_row
            from psycopg_pool import ConnectionPool
        except ImportError as exc:  # pragma: no cover - both are main dependencies
            raise JobDatabaseError(f"PostgreSQL job database needs psycopg 3: pip install clipshot ({exc})") from exc
        self.integrity_errors: tuple[type[BaseException], ...] = (psycopg.errors.IntegrityError,)
        try:  # one direct attempt first: the pool would retry in the background and hide the reason
            psycopg.connect(url, connect_timeout=CONNECT_TIMEOUT_S).close()
        except psycopg.Error as exc:
            reason = " ".join(str(exc).split()) or type(exc).__name__
            raise JobDatabaseError(f"cannot connect to the job database {self.location}: {reason}") from exc
        self._pool = ConnectionPool(url, min_size=1, max_size=pool_size, open=True, name=name,
                                    kwargs={"row_factory": dict_row, "connect_timeout": CONNECT_TIMEOUT_S},
                                    check=ConnectionPool.check_connection)
        with self.tx() as tx:
            schema(self, tx)

    @contextmanager
    def tx(self) -> Iterator[_PgTx]:
        """One transaction on a pooled connection (rolled back if the block raises)."""
        with self._pool.connection() as conn, conn.transaction():
            yield _PgTx(conn)

    def close(self) -> None:
        self._pool.close()
