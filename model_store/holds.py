"""Holds: what a live writer is still using, so pruning and orphan sweeps never take it away.

A hold is a small file in ``<category>/.holds/`` listing version numbers and shot file names, kept under
an exclusive ``flock`` by the process that made it for as long as it works (a fine-tune holds the version
it trained from, a fit holds the shot files it stored but no version lists yet). Why a lock and not an
age: the kernel drops a dead process's locks, so a crashed writer's hold is recognised at once and a
live one however long it runs (a 40 MP registration can take minutes), across processes and replicas
sharing the store. Readers (the sweep, pruning) look at holds only under the category lock, and writers
add names under that same lock, so a name is always listed before the file it protects appears.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from .atomic import fsync_dir, tmp_name

HOLDS_DIR = ".holds"


class Hold:
    """One live hold; ``add`` appends entries (call it under the category lock, before the data exists)."""

    def __init__(self, fd: int, path: Path) -> None:
        self._fd, self.path = fd, path
        self.versions: set[int] = set()
        self.shots: set[str] = set()

    def add(self, *, versions: Iterable[int] = (), shots: Iterable[str] = ()) -> None:
        """Record more versions/shot names; durable before it returns, so a sweep that follows sees them."""
        lines = [f"v {int(v)}\n" for v in versions if int(v) not in self.versions]
        lines += [f"s {name}\n" for name in shots if name not in self.shots]
        if not lines:
            return
        os.write(self._fd, "".join(lines).encode("utf-8"))
        os.fsync(self._fd)
        self.versions.update(int(v) for v in versions)
        self.shots.update(shots)

    def discard(self, *, shots: Iterable[str]) -> None:
        """Stop holding ``shots`` (call under the category lock), e.g. before removing files of a failed fit."""
        self.shots.difference_update(shots)
        os.ftruncate(self._fd, 0)
        lines = [f"v {v}\n" for v in sorted(self.versions)] + [f"s {name}\n" for name in sorted(self.shots)]
        os.write(self._fd, "".join(lines).encode("utf-8"))
        os.fsync(self._fd)


@contextlib.contextmanager
def hold(directory: Path) -> Iterator[Hold]:
    """A new, empty hold in ``directory`` for the duration of the block (removed afterwards).

    The file is written and locked under a temp name first and only then renamed into ``.holds/``, so a
    reader never finds a hold file that is not yet locked (it would take it for a dead writer's)."""
    holds = directory / HOLDS_DIR
    holds.mkdir(parents=True, exist_ok=True)
    tmp = directory / tmp_name()
    final = holds / tmp.name.lstrip(".")
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.rename(tmp, final)
        fsync_dir(holds)
        yield Hold(fd, final)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        with contextlib.suppress(OSError):
            os.unlink(final)
        os.close(fd)


def live_holds(directory: Path) -> tuple[set[int], set[str]]:
    """(versions, shot names) held by live writers; dead writers' hold files are removed on the way.

    Call under the category lock (so no entry is being added while it is read)."""
    versions: set[int] = set()
    shots: set[str] = set()
    holds = directory / HOLDS_DIR
    if not holds.is_dir():
        return versions, shots
    for entry in holds.iterdir():
        try:
            fd = os.open(entry, os.O_RDONLY)
        except OSError:
            continue  # its writer finished meanwhile
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:  # a live writer holds it: read what it protects
                text = os.read(fd, 1 << 22).decode("utf-8", "replace")
                for line in text.splitlines():
                    kind, _, value = line.partition(" ")
                    if kind == "v" and value.isdigit():
                        versions.add(int(value))
                    elif kind == "s" and value:
                        shots.add(value)
                continue
            with contextlib.suppress(OSError):  # nobody holds it: a crashed writer's leftover
                entry.unlink()
        finally:
            os.close(fd)
    return versions, shots
