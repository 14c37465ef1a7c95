"""Persistence of per-product adapter bundles (versioned, checksummed, crash-safe)."""

from .errors import (
    BackboneMismatch,
    BundleCorrupt,
    BundleNotFound,
    ConcurrentModification,
    InvalidInput,
    InvalidName,
    StaleVersion,
    StoreError,
    UnsupportedSchema,
    VersionNotFound,
)
from .manifest import SCHEMA_VERSION, BackboneRef, Manifest, ShotRef, TrainingInfo
from .store import CATEGORY_NAME, CATEGORY_PATTERN, AdapterStore, validate_category

__all__ = [
    "CATEGORY_NAME",
    "CATEGORY_PATTERN",
    "SCHEMA_VERSION",
    "AdapterStore",
    "BackboneMismatch",
    "BackboneRef",
    "BundleCorrupt",
    "BundleNotFound",
    "ConcurrentModification",
    "InvalidInput",
    "InvalidName",
    "Manifest",
    "ShotRef",
    "StaleVersion",
    "StoreError",
    "TrainingInfo",
    "UnsupportedSchema",
    "VersionNotFound",
    "validate_category",
]
