"""HTTP routers: versioned API under /v1, operational endpoints (/healthz, /readyz, /metrics) at the root.

Every router carries its full path prefix itself (``/v1/...``) rather than getting it from a parent
router: the request-metrics middleware labels by ``scope["route"].path``, which only holds the
router's own prefix.
"""

from __future__ import annotations

from fastapi import APIRouter

from app.api.routes import categories, decisions, health, jobs, metrics, predict, product, records


def all_routers() -> list[APIRouter]:
    """Versioned API first, then probes and metrics (unversioned: orchestrators hard-code those paths)."""
    return [predict.router, categories.router, decisions.router, jobs.router, records.router, product.router,
            health.router, metrics.router]
