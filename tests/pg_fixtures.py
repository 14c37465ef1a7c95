"""PostgreSQL fixtures: one throwaway server per test session, one empty schema per test.

Skips only where PostgreSQL is genuinely absent and this is not CI (``CI=true`` turns a missing server into a
failure, so CI can never pass by skipping the shared-database tests).
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pg_cluster
import pytest

from tests.helpers.data import in_ci


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """URL of a running server: ``TEST_POSTGRES_URL`` (as ``.ci/run`` sets it) or one started here."""
    url = os.environ.get("TEST_POSTGRES_URL")
    if url:
        yield url
        return
    if pg_cluster.find_bindir() is None:
        if in_ci():
            pytest.fail("CI must run the PostgreSQL tests: install the server (apt-get install -y postgresql) "
                        "or set TEST_POSTGRES_URL")
        pytest.skip("PostgreSQL server not installed (apt-get install -y postgresql); CI runs these tests")
    folder = Path(tempfile.mkdtemp(prefix="clipshot-pg-", dir="/tmp"))  # short: Unix socket paths are capped
    try:
        url = pg_cluster.start(folder)
    except BaseException:
        pg_cluster.stop(folder)
        raise
    try:
        yield url
    finally:
        pg_cluster.stop(folder)


def with_search_path(url: str, schema: str) -> str:
    """``url`` whose sessions create and find tables in ``schema``."""
    return f"{url}{'&' if '?' in url else '?'}options=-csearch_path%3D{schema}"


@pytest.fixture
def postgres_url(postgres_server: str) -> Iterator[str]:
    """A database URL pointing at a fresh, empty schema (cheaper than a database per test), dropped after."""
    import psycopg

    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_server, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        yield with_search_path(postgres_server, schema)
    finally:
        with psycopg.connect(postgres_server, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")
