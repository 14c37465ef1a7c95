"""``AdapterStore``: the public facade over per-category and generic bundle storage.

Layout (see docs/reference/bundle-format.md)::

    <root>/categories/<category>/v<N>/{adapter.safetensors,manifest.json}
    <root>/categories/<category>/{active.json,pins.json,.lock,.holds/,shots/}
    <root>/generic/v<N>/...  and  <root>/generic/active.json
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .atomic import TRASH_PREFIX, fsync_dir, locked, replace_file, sweep_abandoned, sweep_stale
from .bundles import TENSORS_FILE, UNCHECKED, VersionedBundles, check_version
from .errors import BundleCorrupt, BundleNotFound, InvalidName, StoreError
from .holds import Hold, hold, live_holds
from .manifest import Manifest
from .shots import SHOT_NAME, SHOTS_DIR, list_shots, store_shots, validate_shots

CATEGORY_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
CATEGORY_NAME = re.compile(CATEGORY_PATTERN)
GENERIC_NAME = "generic"
PINS_FILE = "pins.json"
# An unlisted shot file younger than this is left alone even without a hold: writers that take no hold
# (``clipshot train fewshot`` stores its shots and saves the version a moment later) finish well within it.
ORPHAN_GRACE_S = 60.0


def validate_category(category: object) -> str:
    """Reject anything that is not a plain lowercase slug, before it is ever joined into a path."""
    if not isinstance(category, str) or not CATEGORY_NAME.fullmatch(category):
        raise InvalidName(
            f"invalid category name {category!r}: use 1-64 chars of a-z, 0-9, '.', '_', '-', "
            "starting with a letter or digit"
        )
    return category


class AdapterStore:
    """Versioned, crash-safe persistence of adapter bundles and their shot images under ``root``.

    Stateless apart from ``root``: every call reads the disk, so several processes (API workers,
    the trainer) can share one root. Writers serialise on a per-category ``flock``.
    """

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self._categories_dir = self.root / "categories"
        self.generic = VersionedBundles(self.root / GENERIC_NAME, name=GENERIC_NAME, kind="generic")

    def _bundles(self, category: str) -> VersionedBundles:
        name = validate_category(category)
        return VersionedBundles(self._categories_dir / name, name=name, kind="category")

    # ---- category bundles --------------------------------------------------------------
    def save(
        self,
        category: str,
        tensors: dict[str, torch.Tensor],
        manifest: dict[str, Any],
        *,
        activate: bool = True,
        expect_active: int | None = UNCHECKED,
    ) -> int:
        """Store a new version for ``category`` (validated before anything is written); returns N.

        ``expect_active`` (compare-and-set): refuse with ``StaleVersion``, writing nothing, unless the active
        version is still this one (None: the category has none) when the version is committed."""
        return self._bundles(category).save(tensors, manifest, activate=activate, expect_active=expect_active)

    def load(
        self,
        category: str,
        version: int | None = None,
        *,
        backbone_spec: str | None = None,
        backbone_sha256: str | None = None,
        device: str | torch.device = "cpu",
    ) -> tuple[dict[str, torch.Tensor], Manifest]:
        """Load a version (default: active), verifying files, schema, backbone and checksum."""
        return self._bundles(category).load(
            version, backbone_spec=backbone_spec, backbone_sha256=backbone_sha256, device=device
        )

    def derive(self, category: str, version: int, changes: dict[str, Any], *, activate: bool = True,
               expect_active: int | None = UNCHECKED) -> int:
        """New version reusing ``version``'s tensors (checksum verified) with manifest ``changes``; returns N."""
        return self._bundles(category).derive(version, changes, activate=activate, expect_active=expect_active)

    def manifest(self, category: str, version: int | None = None) -> Manifest:
        """A version's manifest (default: active) without reading the tensors."""
        return self._bundles(category).manifest(version)

    def verify(self, category: str, version: int | None = None) -> Manifest:
        """Check a version's files, manifest and tensor checksum; raises BundleCorrupt if damaged."""
        return self._bundles(category).verify(version)

    def tensors_path(self, category: str, version: int) -> Path:
        """Where a version's tensor file lives (for integrity caches keyed on its stat)."""
        return self._bundles(category).path / f"v{version}" / TENSORS_FILE

    def versions(self, category: str) -> list[int]:
        """Committed versions of ``category``, ascending ([] if it does not exist)."""
        return self._bundles(category).versions()

    def active_version(self, category: str) -> int | None:
        """The version ``load`` uses by default, or None."""
        return self._bundles(category).active_version()

    def activate(self, category: str, version: int, *, expect_active: int | None = UNCHECKED) -> None:
        """Make an existing version active; raises VersionNotFound otherwise (``expect_active``: as ``save``)."""
        self._bundles(category).activate(version, expect_active=expect_active)

    def rollback(self, category: str, *, expect_active: int | None = UNCHECKED) -> int:
        """Activate the newest version older than the active one; returns it."""
        return self._bundles(category).rollback(expect_active=expect_active)

    def categories(self) -> list[str]:
        """Categories holding at least one version or shot, sorted."""
        if not self._categories_dir.is_dir():
            return []
        found = []
        for entry in self._categories_dir.iterdir():
            if not CATEGORY_NAME.fullmatch(entry.name) or entry.is_symlink() or not entry.is_dir():
                continue
            bundles = VersionedBundles(entry, name=entry.name, kind="category")
            if bundles.versions() or list_shots(entry / SHOTS_DIR):
                found.append(entry.name)
        return sorted(found)

    def delete(self, category: str) -> None:
        """Remove a category with all versions and shots.

        The directory is first renamed to a hidden trash name (atomic: readers see all or nothing),
        then removed; a crash mid-removal leaves only hidden trash, swept by a later delete.
        """
        path = self._bundles(category).path
        if not path.is_dir():
            raise BundleNotFound(f"category {category!r} does not exist")
        trash = self._categories_dir / f"{TRASH_PREFIX}{category}-{uuid.uuid4().hex}"
        with locked(path):
            os.rename(path, trash)
            fsync_dir(self._categories_dir)
        shutil.rmtree(trash, ignore_errors=True)
        sweep_stale(self._categories_dir)

    def sweep_abandoned(self) -> int:
        """Remove what crashed writers left (temp bundle dirs and files, shot temp files, trash); returns a count.

        Run at service start-up. Safe beside other live processes: a temp dir being written is held under
        an ``flock`` by its writer and skipped.
        """
        dirs = [self._categories_dir, self.generic.path]
        if self._categories_dir.is_dir():
            for entry in self._categories_dir.iterdir():
                if CATEGORY_NAME.fullmatch(entry.name) and entry.is_dir() and not entry.is_symlink():
                    dirs += [entry, entry / SHOTS_DIR]
        return sum(sweep_abandoned(d) for d in dirs if d.is_dir())

    # ---- shots -------------------------------------------------------------------------
    def save_shots(self, category: str, files: list[tuple[str, bytes]], *, held: Hold | None = None) -> list[str]:
        """Store uploaded images as ``<sha256><ext>`` (deduplicated); returns the stored name per file.

        ``held``: a hold (from ``hold``) that records the names before the files appear, so no sweep removes
        them before the caller's version lists them."""
        path = self._bundles(category).path
        named = validate_shots(files)
        if not named:
            return []
        path.mkdir(parents=True, exist_ok=True)
        with locked(path):
            if held is not None:  # the name each file will have (a duplicate keeps its stored spelling)
                existing = {p.name.split(".", 1)[0]: p.name for p in list_shots(path / SHOTS_DIR)}
                held.add(shots=[existing.get(n.split(".", 1)[0], n) for n, _ in named])
            return store_shots(path / SHOTS_DIR, named)

    def shot_paths(self, category: str) -> list[Path]:
        """Stored image files of ``category`` (shots, confirmed goods and defects, and orphans), sorted."""
        return list_shots(self._bundles(category).path / SHOTS_DIR)

    def shot_path(self, category: str, name: str) -> Path:
        """Where the stored image ``name`` (``<sha256><ext>``, as a manifest lists it) lives."""
        if not SHOT_NAME.fullmatch(name):
            raise InvalidName(f"invalid shot file name {name!r}")
        return self._bundles(category).path / SHOTS_DIR / name

    def referenced_shots(self, category: str) -> set[str]:
        """File names some version's manifest lists (shots or validation); unreadable versions list none."""
        bundles = self._bundles(category)
        names: set[str] = set()
        for version in bundles.versions():
            try:
                manifest = bundles.manifest(version)
            except StoreError:
                continue
            names.update(ref.name for ref in (*manifest.shots, *manifest.validation))
        return names

    def sweep_orphan_shots(self, category: str, *, max_age: float = ORPHAN_GRACE_S) -> list[str]:
        """Remove image files no version lists and no live writer holds (left by a crash mid-fit).

        Safe beside fits in other processes: a fit holds the files it stored until its version lists them
        (``hold``), and the check runs under the category lock that storing takes. ``max_age`` spares young
        files of writers that take no hold."""
        path = self._bundles(category).path
        if not path.is_dir():
            return []
        with locked(path):
            return self._sweep_orphans(category, path, max_age)

    def _sweep_orphans(self, category: str, path: Path, max_age: float) -> list[str]:
        removed = []
        now = time.time()
        keep = self.referenced_shots(category) | live_holds(path)[1]
        for file in list_shots(path / SHOTS_DIR):
            with contextlib.suppress(OSError):
                if file.name not in keep and now - file.stat().st_mtime >= max_age:
                    file.unlink()
                    removed.append(file.name)
        return removed

    def forget_shots(self, category: str, names: list[str], held: Hold) -> list[str]:
        """Undo a failed fit's upload: drop ``names`` from ``held`` and remove those files no version lists and
        no other writer holds (another request may have stored the same image); returns the removed names."""
        path = self._bundles(category).path
        if not names or not path.is_dir():
            return []
        with locked(path):
            held.discard(shots=names)
            keep = self.referenced_shots(category) | live_holds(path)[1]
            removed = [name for name in names if name not in keep]
            for name in removed:
                self.shot_path(category, name).unlink(missing_ok=True)
        return removed

    # ---- holds, pins and retention ---------------------------------------------------------
    @contextlib.contextmanager
    def hold(self, category: str) -> Iterator[Hold]:
        """A hold on versions/shot files of ``category`` for the block; see ``model_store.holds``."""
        path = self._bundles(category).path
        path.mkdir(parents=True, exist_ok=True)
        with hold(path) as held:
            yield held

    def hold_active(self, held: Hold, category: str) -> int:
        """Add the active version to ``held`` under the lock (so no prune can slip in between); returns it."""
        bundles = self._bundles(category)
        with locked(bundles.path):
            version = bundles.active_version()
            if version is None:
                raise BundleNotFound(f"category {category!r} has no active version")
            held.add(versions=[version])
        return version

    def pinned(self, category: str) -> set[int]:
        """Versions an operator pinned (retention never deletes them)."""
        try:
            data = json.loads((self._bundles(category).path / PINS_FILE).read_bytes())
            return {check_version(v) for v in data["versions"]}
        except FileNotFoundError:
            return set()
        except (ValueError, KeyError, TypeError, StoreError) as exc:
            raise BundleCorrupt(f"category {category!r}: {PINS_FILE} is unreadable ({exc}); "
                                "pin or unpin a version to rewrite it") from exc

    def pin(self, category: str, version: int, pinned: bool = True) -> set[int]:
        """Pin (or unpin) an existing version so retention keeps it; returns the pinned set."""
        bundles = self._bundles(category)
        check_version(version)
        with locked(bundles.path):
            if pinned:
                bundles.manifest(version)  # VersionNotFound / BundleCorrupt: nothing to pin
            try:
                pins = self.pinned(category)
            except BundleCorrupt:
                pins = set()
            pins = pins | {version} if pinned else pins - {version}
            replace_file(bundles.path / PINS_FILE, json.dumps({"versions": sorted(pins)}).encode() + b"\n")
        return pins

    def tidy(self, category: str, *, keep_versions: int,
             max_age: float = ORPHAN_GRACE_S) -> tuple[list[int], list[str]]:
        """After a version change: delete versions beyond the newest ``keep_versions`` (0: keep all) except
        the active, pinned and held ones, then the shot files no remaining version lists; returns both."""
        bundles = self._bundles(category)
        if not bundles.path.is_dir():
            return [], []
        with locked(bundles.path):
            pruned: list[int] = []
            if keep_versions > 0:
                try:
                    protected = self.pinned(category)
                except BundleCorrupt:
                    protected = set(bundles.versions())  # cannot tell which are pinned: delete no version
                pruned = bundles.prune(keep_versions, protected | live_holds(bundles.path)[0])
            return pruned, self._sweep_orphans(category, bundles.path, max_age)

    # ---- generic (zero-shot, object-agnostic) bundle -----------------------------------
    def save_generic(
        self, tensors: dict[str, torch.Tensor], manifest: dict[str, Any], *, activate: bool = True
    ) -> int:
        """Store a new generic version (same format and rules as categories); returns N."""
        return self.generic.save(tensors, manifest, activate=activate)

    def load_generic(
        self,
        version: int | None = None,
        *,
        backbone_spec: str | None = None,
        backbone_sha256: str | None = None,
        device: str | torch.device = "cpu",
    ) -> tuple[dict[str, torch.Tensor], Manifest]:
        """Load the generic bundle (default: active version) with the same checks as ``load``."""
        return self.generic.load(
            version, backbone_spec=backbone_spec, backbone_sha256=backbone_sha256, device=device
        )
