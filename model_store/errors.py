"""Exceptions raised by the model store.

Every failure the store can diagnose has its own subclass of :class:`StoreError`, so the service
can map them to HTTP statuses (invalid input -> 400/422, not found -> 404, corrupt/mismatch -> 409/500)
without parsing messages. Messages say what is wrong *and* what to do about it.
"""

from __future__ import annotations


class StoreError(Exception):
    """Base class for every error raised by ``model_store``."""


class InvalidName(StoreError, ValueError):
    """A category name fails validation; raised before any filesystem access."""


class InvalidInput(StoreError, ValueError):
    """Tensors, manifest fields, version numbers or shot files are unusable; nothing was written."""


class BundleNotFound(StoreError, LookupError):
    """The category (or generic slot) has no bundle, or no active version."""


class VersionNotFound(BundleNotFound):
    """A specific version ``vN`` does not exist."""


class BundleCorrupt(StoreError):
    """A stored bundle is unreadable: missing/extra files, bad manifest, or checksum mismatch."""


class UnsupportedSchema(BundleCorrupt):
    """The manifest was written with a schema version this code cannot read."""


class BackboneMismatch(StoreError):
    """The bundle was built for a different backbone than the one the caller has loaded."""


class ConcurrentModification(StoreError):
    """The category was deleted by another writer while this operation waited for the lock."""


class StaleVersion(ConcurrentModification):
    """A compare-and-set on the active version failed: another writer changed it since the caller read it.

    ``expected``/``actual`` are the version numbers (None: no active version); nothing was written."""

    def __init__(self, message: str, *, expected: int | None, actual: int | None) -> None:
        super().__init__(message)
        self.expected, self.actual = expected, actual
