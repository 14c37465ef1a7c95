"""The record's tables (inspections, audit events) on the job database's connection layer, with versioned migrations.

Why the job layer: one set of connection, transaction and dialect code for every table the service keeps. The
embedded default is its own SQLite file (``records.sqlite3`` in the store) so that a busy line's record writes
never hold the lock a fine-tune claim waits for; with ``job_db`` set, the tables live in that PostgreSQL
database next to ``jobs``, shared by every replica.

Migrations: ``schema_version`` holds one row per component (here ``records``) with the last migration applied;
opening the database applies the newer ones in order, in one transaction (PostgreSQL: under an advisory lock, so
two replicas starting together migrate once). A migration is a list of statements with ``{id}`` and ``{real}``
standing for the two words in which the dialects differ. Never edit a released migration: append one.
"""

from __future__ import annotations

from pathlib import Path

from app.jobs.job_db import JobDatabase, JobDatabaseError, Tx, open_job_database

DB_FILENAME = "records.sqlite3"
COMPONENT = "records"
_LOCK_ID = 0x636C7265  # pg_advisory_xact_lock key of the record's migrations (the jobs table has its own)
_DIALECT = {
    "sqlite": {"id": "INTEGER PRIMARY KEY AUTOINCREMENT", "real": "REAL"},
    "postgresql": {"id": "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY", "real": "DOUBLE PRECISION"},
}
MIGRATIONS: list[tuple[int, list[str]]] = [
    (1, [
        """CREATE TABLE inspections (
            id {id},
            time TEXT NOT NULL,
            category TEXT NOT NULL,
            version INTEGER,
            score {real} NOT NULL,
            score_normalized {real},
            verdict TEXT NOT NULL CHECK (verdict IN ('normal', 'anomalous', 'unknown')),
            threshold {real},
            map_threshold {real},
            request_id TEXT,
            part_id TEXT,
            line TEXT,
            camera TEXT,
            filename TEXT,
            sha256 TEXT NOT NULL,
            image_path TEXT,
            overlay_path TEXT,
            image_bytes BIGINT NOT NULL DEFAULT 0,
            replica TEXT)""",
        "CREATE INDEX inspections_by_time ON inspections (category, time DESC, id DESC)",
        "CREATE INDEX inspections_by_part ON inspections (category, part_id)",
        "CREATE INDEX inspections_all_by_time ON inspections (time)",
        """CREATE TABLE audit_events (
            id {id},
            time TEXT NOT NULL,
            key_name TEXT NOT NULL,
            scope TEXT NOT NULL,
            action TEXT NOT NULL,
            category TEXT,
            before_version INTEGER,
            after_version INTEGER,
            detail TEXT,
            request_id TEXT)""",
        "CREATE INDEX audit_by_time ON audit_events (time DESC, id DESC)",
        "CREATE INDEX audit_by_category ON audit_events (category, time DESC, id DESC)",
    ]),
    (2, [  # the verdict's confidence (conformal p-values), as the predict answer gives it
        "ALTER TABLE inspections ADD COLUMN p_value {real}",
        "ALTER TABLE inspections ADD COLUMN good_p_value {real}",
        "ALTER TABLE inspections ADD COLUMN defect_p_value {real}",
        "ALTER TABLE inspections ADD COLUMN defect_evidence TEXT",
    ]),
]
LATEST = MIGRATIONS[-1][0]


def migrate(db: JobDatabase, tx: Tx) -> None:
    """Bring the record's tables to ``LATEST`` (a no-op when they are there already)."""
    if db.dialect == "postgresql":
        tx.run("SELECT pg_advisory_xact_lock(?)", (_LOCK_ID,))
    tx.run("CREATE TABLE IF NOT EXISTS schema_version (component TEXT PRIMARY KEY, version INTEGER NOT NULL)")
    row = tx.one("SELECT version FROM schema_version WHERE component = ?", (COMPONENT,))
    current = row["version"] if row else 0
    if current > LATEST:
        raise JobDatabaseError(f"the record's tables are at schema version {current}, newer than this clipshot "
                           f"({LATEST}): upgrade clipshot")
    words = _DIALECT[db.dialect]
    for version, statements in MIGRATIONS:
        if version <= current:
            continue
        for sql in statements:
            tx.run(sql.format(**words))
    if current == 0:
        tx.run("INSERT INTO schema_version (component, version) VALUES (?, ?)", (COMPONENT, LATEST))
    elif current < LATEST:
        tx.run("UPDATE schema_version SET version = ? WHERE component = ?", (LATEST, COMPONENT))


def open_record_database(store_dir: Path, url: str | None = None) -> JobDatabase:
    """``<store_dir>/records.sqlite3``, or the PostgreSQL database at ``url``, migrated; raises ``JobDatabaseError``."""
    return open_job_database(store_dir, url, filename=DB_FILENAME, schema=migrate, name="clipshot-records")
