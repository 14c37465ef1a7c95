"""HTTP routers: versioned API under /v1, operational endpoints (/healthz, /readyz, /metrics) at the root.

Every router carries its full path prefix itself (``/v1/...``) rather than getting it from a parent
router: the request-metrics middleware labels by ``scope["route"].path``, which only holds the
router's own prefix. Routers of optional modules (category registration, jobs) are included when
their module exists, so each part of the service can land independently.
"""

from __future__ import annotations

import importlib
import importlib.util

from fastapi import APIRouter

from app.api.routes import health, metrics, predict

OPTIONAL_ROUTERS = ("app.api.routes.categories", "app.api.routes.jobs")


def optional_routers() -> list[APIRouter]:
    """Routers of the optional modules that exist (an import error inside one is NOT hidden)."""
    return [importlib.import_module(name).router for name in OPTIONAL_ROUTERS
            if importlib.util.find_spec(name) is not None]


def all_routers() -> list[APIRouter]:
    """Versioned API first, then probes and metrics (unversioned: orchestrators hard-code those paths)."""
    return [predict.router, *optional_routers(), health.router, metrics.router]
