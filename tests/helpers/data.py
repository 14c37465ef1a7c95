"""Tests that read the real data sets under ``../shared``: skipped on a developer box without them, failed in CI.

Why: CI mounts ``../shared``; a missing mount must turn the real-accuracy tests red rather than let the suite
pass by skipping the only tests that measure the model on real photos.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def in_ci() -> bool:
    """True under CI (``CI=true``, as GitHub Actions and ``.ci/run``'s environments set it)."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def require_data(path: Path) -> None:
    """Skip the calling test when ``path`` is absent; under CI fail it instead."""
    if path.exists():
        return
    if in_ci():
        pytest.fail(f"CI must run this test: {path} is absent (mount ../shared next to the checkout)")
    pytest.skip(f"{path} is absent")
