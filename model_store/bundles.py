"""Versioned bundle slots: immutable ``v1..vN`` directories plus an ``active.json`` pointer.

One class serves both per-category bundles and the generic (zero-shot) bundle, so the crash-safety
and validation rules exist exactly once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import stat
import uuid
from pathlib import Path
from typing import Any

import torch

from .atomic import (
    TRASH_PREFIX,
    claimed_tmp_dir,
    fsync_dir,
    locked,
    rename_new,
    replace_file,
    sha256_file,
    sweep_stale,
    write_new_file,
)
from .errors import BackboneMismatch, BundleCorrupt, BundleNotFound, InvalidInput, StaleVersion, VersionNotFound
from .manifest import STORE_FIELDS, Kind, Manifest, build_manifest, dump_manifest, parse_manifest
from .tensors import load_tensors, serialize_tensors

TENSORS_FILE = "adapter.safetensors"
MANIFEST_FILE = "manifest.json"
BUNDLE_FILES = frozenset({TENSORS_FILE, MANIFEST_FILE})
ACTIVE_FILE = "active.json"
_VERSION_DIR = re.compile(r"^v([1-9][0-9]*)$")


class _Unchecked:
    def __repr__(self) -> str:
        return "UNCHECKED"


UNCHECKED: Any = _Unchecked()  # ``expect_active`` default: change the version whatever is active


def check_version(version: object) -> int:
    """Versions are positive ints; reject bools/strings early with a clear message."""
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise InvalidInput(f"version must be a positive int, got {version!r}")
    return version


class VersionedBundles:
    """All versions of one bundle slot living in ``path`` (a category dir or ``<root>/generic``)."""

    def __init__(self, path: Path, *, name: str, kind: Kind) -> None:
        self.path = path
        self.name = name
        self.kind = kind
        self.label = f"category {name!r}" if kind == "category" else "the generic bundle"

    # ---- reading -------------------------------------------------------------------------
    def versions(self) -> list[int]:
        """Committed versions, ascending; temp dirs of in-flight or crashed writes are invisible."""
        if not self.path.is_dir():
            return []
        found = []
        for entry in self.path.iterdir():
            match = _VERSION_DIR.match(entry.name)
            if match and entry.is_dir() and not entry.is_symlink():
                found.append(int(match.group(1)))
        return sorted(found)

    def active_version(self) -> int | None:
        """The version ``load()`` uses by default, or None if nothing was activated yet."""
        pointer = self.path / ACTIVE_FILE
        try:
            raw = pointer.read_bytes()
        except FileNotFoundError:
            return None
        try:
            version = json.loads(raw)["version"]
            return check_version(version)
        except (ValueError, KeyError, TypeError, InvalidInput) as exc:
            raise BundleCorrupt(
                f"{self.label}: {ACTIVE_FILE} is unreadable ({exc}); repair it by activating a version"
            ) from exc

    def _resolve(self, version: int | None) -> tuple[int, Path]:
        if version is None:
            version = self.active_version()
            if version is None:
                raise BundleNotFound(f"{self.label} has no active version; save a bundle or activate one")
        check_version(version)
        vdir = self.path / f"v{version}"
        if not vdir.is_dir() or vdir.is_symlink():
            raise VersionNotFound(
                f"{self.label} has no version {version} (available: {self.versions() or 'none'})"
            )
        return version, vdir

    def _checked_dir(self, version: int, vdir: Path) -> str:
        """Only the two expected regular files may exist: no pickles, symlinks or leftovers."""
        where = f"{self.label} v{version}"
        entries = {entry.name: entry for entry in vdir.iterdir()}
        extra = sorted(set(entries) - BUNDLE_FILES)
        if extra:
            raise BundleCorrupt(
                f"{where}: unexpected files {extra}; a bundle holds only {sorted(BUNDLE_FILES)}"
            )
        missing = sorted(BUNDLE_FILES - set(entries))
        if missing:
            raise BundleCorrupt(f"{where}: missing {missing}; the bundle is incomplete, re-save it")
        for entry in entries.values():
            if not stat.S_ISREG(entry.lstat().st_mode):
                raise BundleCorrupt(f"{where}: {entry.name} is not a regular file; re-save the bundle")
        return where

    def _read_manifest(self, version: int, vdir: Path, where: str) -> Manifest:
        manifest = parse_manifest((vdir / MANIFEST_FILE).read_bytes(), where=where)
        stored = (manifest.category, manifest.version, manifest.kind)
        if stored != (self.name, version, self.kind):
            raise BundleCorrupt(
                f"{where}: manifest describes {manifest.kind} {manifest.category!r} v{manifest.version}; "
                "the directory was copied or renamed by hand, re-save it through the store"
            )
        return manifest

    def manifest(self, version: int | None = None) -> Manifest:
        """Read and validate a version's manifest without loading tensors (cheap listing/inspection)."""
        version, vdir = self._resolve(version)
        return self._read_manifest(version, vdir, self._checked_dir(version, vdir))

    def verify(self, version: int | None = None) -> Manifest:
        """Check a version's files, manifest and tensor checksum (no tensors parsed); raises BundleCorrupt."""
        version, vdir = self._resolve(version)
        where = self._checked_dir(version, vdir)
        manifest = self._read_manifest(version, vdir, where)
        self._check_digest(vdir, manifest, where)
        return manifest

    @staticmethod
    def _check_digest(vdir: Path, manifest: Manifest, where: str) -> None:
        digest = sha256_file(vdir / TENSORS_FILE)
        if digest != manifest.tensors_sha256:
            raise BundleCorrupt(
                f"{where}: adapter.safetensors sha256 is {digest}, manifest says {manifest.tensors_sha256}; "
                "the file is damaged, restore it or activate another version"
            )

    def load(
        self,
        version: int | None = None,
        *,
        backbone_spec: str | None = None,
        backbone_sha256: str | None = None,
        device: str | torch.device = "cpu",
    ) -> tuple[dict[str, torch.Tensor], Manifest]:
        """Load a version (default: active) after checking files, schema, backbone and checksum."""
        version, vdir = self._resolve(version)
        where = self._checked_dir(version, vdir)
        manifest = self._read_manifest(version, vdir, where)
        for field, expected in (("spec", backbone_spec), ("sha256", backbone_sha256)):
            actual = getattr(manifest.backbone, field)
            if expected is not None and expected != actual:
                raise BackboneMismatch(
                    f"{where} was built for backbone {field} {actual!r} but {expected!r} is loaded; "
                    "load the matching backbone or refit the adapter on this one"
                )
        self._check_digest(vdir, manifest, where)
        return load_tensors(vdir / TENSORS_FILE, device=device, where=where), manifest

    # ---- writing -------------------------------------------------------------------------
    def save(
        self, tensors: dict[str, torch.Tensor], manifest: dict[str, Any], *, activate: bool = True,
        expect_active: int | None = UNCHECKED,
    ) -> int:
        """Write a new immutable version; returns its number.

        Everything is validated in memory first. The tensor file is written into a hidden temp dir
        without the lock (it can be large); the lock is held only to pick ``N``, write the manifest
        and rename the temp dir to ``vN``, so concurrent writers never share a number.
        ``expect_active``: compare-and-set, see ``check_active``; on a mismatch nothing is written.
        """
        payload = serialize_tensors(tensors)
        return self._commit(payload, manifest, activate=activate, expect_active=expect_active)

    def check_active(self, expect_active: int | None) -> None:
        """Raise ``StaleVersion`` unless the active version is ``expect_active`` (None: no active version).

        Why: an edit is computed from the version that served when it started (its shots, its policy); if
        another writer (a replica, a job, an operator) moved the pointer meanwhile, writing on would silently
        undo that change. Call under the slot's lock. An unreadable pointer counts as no active version, so
        a registration can still repair it."""
        if expect_active is UNCHECKED:
            return
        try:
            actual = self.active_version()
        except BundleCorrupt:
            actual = None
        if actual != expect_active:
            raise StaleVersion(
                f"{self.label}: the active version is {'none' if actual is None else f'v{actual}'}, not "
                f"{'none' if expect_active is None else f'v{expect_active}'} as when this change started (another "
                "writer changed it meanwhile); nothing was written, retry against the current version",
                expected=expect_active, actual=actual)

    def derive(self, version: int, changes: dict[str, Any], *, activate: bool = True,
               expect_active: int | None = UNCHECKED) -> int:
        """A new version holding ``version``'s tensors byte for byte and its manifest updated with ``changes``.

        Why: a policy change (a new threshold) alters only the manifest, so re-serialising tensors would be
        wasted work. The source file is verified against its checksum first, so a damaged bundle is never
        copied into a fresh-looking version.
        """
        version, vdir = self._resolve(version)
        where = self._checked_dir(version, vdir)
        source = self._read_manifest(version, vdir, where)
        payload = (vdir / TENSORS_FILE).read_bytes()
        if hashlib.sha256(payload).hexdigest() != source.tensors_sha256:
            raise BundleCorrupt(f"{where}: adapter.safetensors does not match its checksum; "
                                "activate another version before deriving from it")
        partial = {k: v for k, v in source.model_dump(mode="json").items() if k not in STORE_FIELDS}
        partial.update(changes)
        return self._commit(payload, partial, activate=activate, expect_active=expect_active)

    def _commit(self, payload: bytes, manifest: dict[str, Any], *, activate: bool,
                expect_active: int | None = UNCHECKED) -> int:
        digest = hashlib.sha256(payload).hexdigest()
        draft = build_manifest(manifest, name=self.name, kind=self.kind, version=1, tensors_sha256=digest)
        if not isinstance(activate, bool):
            raise InvalidInput(f"activate must be a bool, got {activate!r}")

        self.path.mkdir(parents=True, exist_ok=True)
        sweep_stale(self.path)
        with claimed_tmp_dir(self.path) as tmp:
            try:
                write_new_file(tmp / TENSORS_FILE, payload)
                with locked(self.path):
                    self.check_active(expect_active)
                    version = max(self.versions(), default=0) + 1
                    final = draft.model_copy(update={"version": version})
                    write_new_file(tmp / MANIFEST_FILE, dump_manifest(final))
                    fsync_dir(tmp)
                    rename_new(tmp, self.path / f"v{version}")
                    if activate:
                        self._write_pointer(version)
            except BaseException:
                with contextlib.suppress(OSError):
                    shutil.rmtree(tmp)
                raise
        return version

    def activate(self, version: int, *, expect_active: int | None = UNCHECKED) -> None:
        """Point ``active.json`` at an existing version (rollback = activate an older one)."""
        check_version(version)
        if not self.path.is_dir():
            raise BundleNotFound(f"{self.label} does not exist; save a bundle first")
        with locked(self.path):
            self.check_active(expect_active)
            self.verify(version)  # refuse to point at a missing, broken or damaged version
            self._write_pointer(version)

    def rollback(self, *, expect_active: int | None = UNCHECKED) -> int:
        """Activate the newest version older than the active one; returns the version now active."""
        if not self.path.is_dir():
            raise BundleNotFound(f"{self.label} does not exist; save a bundle first")
        with locked(self.path):
            self.check_active(expect_active)
            active = self.active_version()
            if active is None:
                raise BundleNotFound(f"{self.label} has no active version to roll back from")
            older = [v for v in self.versions() if v < active]
            if not older:
                raise VersionNotFound(f"{self.label}: no version older than v{active} to roll back to")
            self.verify(older[-1])
            self._write_pointer(older[-1])
            return older[-1]

    def prune(self, keep: int, protected: set[int]) -> list[int]:
        """Delete all but the newest ``keep`` versions, never the active one or ``protected``; returns those removed.

        Call under the slot's lock. Each version directory is renamed to hidden trash first (readers see it
        whole or not at all), then removed."""
        try:
            active = self.active_version()
        except BundleCorrupt:
            return []  # cannot tell which version serves: delete nothing
        versions = self.versions()
        spare = set(versions[-keep:]) | set(protected) | ({active} if active is not None else set())
        removed = []
        for version in versions:
            if version in spare:
                continue
            trash = self.path / f"{TRASH_PREFIX}v{version}-{uuid.uuid4().hex}"
            os.rename(self.path / f"v{version}", trash)
            shutil.rmtree(trash, ignore_errors=True)
            removed.append(version)
        if removed:
            fsync_dir(self.path)
        return removed

    def _write_pointer(self, version: int) -> None:
        replace_file(self.path / ACTIVE_FILE, json.dumps({"version": version}).encode("utf-8") + b"\n")
