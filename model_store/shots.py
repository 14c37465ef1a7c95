"""Content-addressed storage of the original uploaded shot images.

Files are named ``<sha256><ext>`` so re-uploading the same image is a no-op and a manifest's
``shots`` list can be verified against the bytes on disk.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from pathlib import Path, PurePosixPath

from .atomic import fsync_dir, rename_new, tmp_name, write_new_file
from .errors import InvalidInput

SHOTS_DIR = "shots"
_EXTENSION = re.compile(r"^\.[a-z0-9]{1,10}$")
SHOT_NAME = re.compile(r"^[0-9a-f]{64}(\.[a-z0-9]{1,10})?$")


def _extension(filename: str) -> str:
    """Keep a sane original extension (decoders sniff content anyway); drop anything odd."""
    suffix = PurePosixPath(filename.replace("\\", "/")).suffix.lower()
    return suffix if _EXTENSION.match(suffix) else ""


def validate_shots(files: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    """Check every upload before writing any of them: ``(filename, non-empty bytes)`` pairs."""
    if not isinstance(files, list | tuple):
        raise InvalidInput(f"files must be a list of (filename, bytes), got {type(files).__name__}")
    named = []
    for index, item in enumerate(files):
        if not (isinstance(item, tuple | list) and len(item) == 2):
            raise InvalidInput(f"files[{index}] must be a (filename, bytes) pair")
        filename, data = item
        if not isinstance(filename, str):
            raise InvalidInput(f"files[{index}]: filename must be a str, got {type(filename).__name__}")
        if not isinstance(data, bytes | bytearray | memoryview):
            raise InvalidInput(
                f"files[{index}] ({filename!r}): content must be bytes, got {type(data).__name__}"
            )
        data = bytes(data)
        if not data:
            raise InvalidInput(f"files[{index}] ({filename!r}) is empty; upload the image bytes")
        named.append((hashlib.sha256(data).hexdigest() + _extension(filename), data))
    return named


def list_shots(shots_dir: Path) -> list[Path]:
    """Stored shot files, sorted by name; temp files of in-flight writes are skipped."""
    if not shots_dir.is_dir():
        return []
    return sorted(p for p in shots_dir.iterdir() if not p.name.startswith(".") and p.is_file())


def store_shots(shots_dir: Path, named: list[tuple[str, bytes]]) -> list[str]:
    """Write validated shots (caller holds the category lock); returns the stored name per input.

    Identical content is stored once: if a file with the same hash exists under any extension,
    its name is returned instead of writing again.
    """
    shots_dir.mkdir(parents=True, exist_ok=True)
    by_hash = {p.name.split(".", 1)[0]: p.name for p in list_shots(shots_dir)}
    stored = []
    for name, data in named:
        digest = name.split(".", 1)[0]
        if digest not in by_hash:
            tmp = shots_dir / tmp_name()
            try:
                write_new_file(tmp, data)
                rename_new(tmp, shots_dir / name)
            except BaseException:
                with contextlib.suppress(OSError):
                    tmp.unlink()
                raise
            by_hash[digest] = name
        stored.append(by_hash[digest])
    fsync_dir(shots_dir)
    return stored
