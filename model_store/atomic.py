"""Crash-safe filesystem primitives: durable writes, atomic replace/rename, per-directory locks.

Readers never take locks, so every change a reader can observe must be a single ``rename``/``replace``
of fully written and fsynced content; locks only serialise writers (version numbering, pointer moves).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from .errors import ConcurrentModification

TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
LOCK_NAME = ".lock"
STALE_SECONDS = 3600.0  # a temp/trash entry this old belongs to a crashed writer


def tmp_name() -> str:
    """A hidden, unique name: hidden so listings never mistake it for a version or a shot."""
    return f"{TMP_PREFIX}{uuid.uuid4().hex}"


def fsync_dir(path: Path) -> None:
    """Persist a directory's entries (a rename is only durable once its parent is fsynced)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_new_file(path: Path, data: bytes) -> None:
    """Create ``path`` (must not exist) with ``data`` and fsync it."""
    with open(path, "xb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def replace_file(path: Path, data: bytes) -> None:
    """Atomically replace ``path``: readers see the old or the new content, never a mix."""
    tmp = path.with_name(tmp_name())
    try:
        write_new_file(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def rename_new(src: Path, dst: Path) -> None:
    """Rename ``src`` to a not-yet-existing ``dst`` and make it durable.

    ``os.rename`` would silently replace an empty directory, so existence is checked first; callers
    hold the directory lock, which makes the check-then-rename race-free among writers.
    """
    if dst.exists() or dst.is_symlink():
        raise FileExistsError(f"{dst} already exists")
    os.rename(src, dst)
    fsync_dir(dst.parent)


def sha256_file(path: Path) -> str:
    """Stream a file's sha256 (bundles can hold hundreds of MB of memory bank)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def sweep_stale(directory: Path, *, max_age: float = STALE_SECONDS) -> None:
    """Best-effort removal of temp/trash entries left behind by crashed writers."""
    now = time.time()
    with contextlib.suppress(OSError):
        for entry in directory.iterdir():
            if not entry.name.startswith((TMP_PREFIX, TRASH_PREFIX)):
                continue
            with contextlib.suppress(OSError):
                if now - entry.lstat().st_mtime < max_age:
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink()


TMP_FILE_GRACE_SECONDS = 60.0  # a temp *file* lives for one write + rename (ms); older ones were abandoned


@contextlib.contextmanager
def claimed_tmp_dir(parent: Path) -> Iterator[Path]:
    """Create a hidden temp dir and hold an ``flock`` on it while the caller fills it.

    The lock is what start-up sweeping asks: a temp dir whose lock can be taken has no live writer (the
    kernel drops a dead process's locks), so a crashed write is swept at once, never a running one.
    """
    while True:
        tmp = parent / tmp_name()
        tmp.mkdir()
        fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if (os.fstat(fd).st_ino, os.fstat(fd).st_dev) == (os.stat(tmp).st_ino, os.stat(tmp).st_dev):
                break  # ours, and not swept between mkdir and flock
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield tmp
    finally:
        os.close(fd)


def sweep_abandoned(directory: Path) -> int:
    """Start-up sweep: remove temp dirs no live writer holds, old temp files and all trash; returns a count."""
    removed = 0
    with contextlib.suppress(OSError):
        for entry in directory.iterdir():
            if entry.name.startswith(TRASH_PREFIX):
                removed += _remove(entry)
            elif entry.name.startswith(TMP_PREFIX):
                with contextlib.suppress(OSError):
                    if entry.is_dir() and not entry.is_symlink():
                        removed += _remove_if_unclaimed(entry)
                    elif time.time() - entry.lstat().st_mtime >= TMP_FILE_GRACE_SECONDS:
                        removed += _remove(entry)
    return removed


def _remove_if_unclaimed(tmp_dir: Path) -> int:
    fd = os.open(tmp_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return 0  # a live writer is filling it
        return _remove(tmp_dir)
    finally:
        os.close(fd)


def _remove(entry: Path) -> int:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry, ignore_errors=True)
    else:
        entry.unlink(missing_ok=True)
    return 0 if entry.exists() or entry.is_symlink() else 1


@contextlib.contextmanager
def locked(directory: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``directory/.lock`` (works across threads and processes).

    After acquiring, checks the lock file is still the one at that path: if another writer deleted
    (renamed away) the directory meanwhile, continuing would write into the trash.
    """
    lock_path = directory / LOCK_NAME
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            current = os.stat(lock_path)
        except FileNotFoundError:
            current = None
        held = os.fstat(fd)
        if current is None or (current.st_dev, current.st_ino) != (held.st_dev, held.st_ino):
            raise ConcurrentModification(f"{directory} was deleted while waiting for its lock; retry")
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock
