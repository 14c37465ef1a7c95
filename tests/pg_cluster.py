"""A throwaway PostgreSQL cluster for tests and CI: ``initdb`` + ``pg_ctl`` as the ``postgres`` user.

Why its own cluster instead of the Debian ``main`` one: no password or ``pg_hba`` edits on the machine, no
port shared with anything else (it listens on a Unix socket in a private folder only), and ``fsync=off``
because the data dies with the test run. ``.ci/run`` starts one and exports its URL as
``TEST_POSTGRES_URL``; ``tests/conftest.py`` starts one itself when that variable is unset.

    python3 tests/pg_cluster.py start DIR   # prints the URL
    python3 tests/pg_cluster.py stop DIR
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

PORT = 5432  # only names the socket file: the cluster listens on no TCP port
USER = "postgres"


def find_bindir() -> Path | None:
    """The newest installed server's bin folder (Debian puts it under /usr/lib/postgresql/N/bin)."""
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).resolve().parent
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    return Path(found[-1]).parent if found else None


def _as_postgres(cmd: list[str]) -> list[str]:
    """The server refuses to run as root: run it as the ``postgres`` user then (util-linux ``runuser``)."""
    return ["runuser", "-u", USER, "--", *cmd] if os.geteuid() == 0 else cmd


def url_for(folder: Path, database: str = "postgres") -> str:
    return f"postgresql://{USER}@/{database}?host={folder}&port={PORT}"


def start(folder: Path) -> str:
    """Create and start a cluster in ``folder`` (an empty or missing directory); returns its URL."""
    bindir = find_bindir()
    if bindir is None:
        raise RuntimeError("PostgreSQL server binaries not found: apt-get install -y postgresql")
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        shutil.chown(folder, USER, USER)
    data, log = folder / "data", folder / "server.log"
    subprocess.run(_as_postgres([str(bindir / "initdb"), "-D", str(data), "-U", USER, "-A", "trust", "-E", "UTF8",
                                 "--no-sync"]), check=True, capture_output=True)
    options = f"-k {folder} -p {PORT} -c listen_addresses='' -c fsync=off -c full_page_writes=off"
    done = subprocess.run(_as_postgres([str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options,
                                        "-w", "-t", "60", "start"]), capture_output=True, text=True)
    if done.returncode != 0:
        tail = log.read_text()[-2000:] if log.exists() else ""
        raise RuntimeError(f"pg_ctl start failed: {done.stdout}{done.stderr}{tail}")
    return url_for(folder)


def stop(folder: Path) -> None:
    """Stop the cluster fast (``-m immediate``) and delete its folder."""
    bindir = find_bindir()
    if bindir is not None and (folder / "data").is_dir():
        subprocess.run(_as_postgres([str(bindir / "pg_ctl"), "-D", str(folder / "data"), "-m", "immediate",
                                     "-w", "stop"]), capture_output=True)
    shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    action, where = sys.argv[1], Path(sys.argv[2])
    if action == "start":
        print(start(where))
    else:
        stop(where)
