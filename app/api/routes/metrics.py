"""Prometheus scrape endpoint (outside /v1; key-protected only if ``metrics_require_key``)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from app.api.deps import AuthFirstRoute, MetricsAccessDep, MetricsDep
from app.api.responses import errors

router = APIRouter(tags=["metrics"], route_class=AuthFirstRoute)


@router.get("/metrics", response_class=Response, summary="Prometheus metrics",
            responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format."},
                       **errors(401, 403, e401="Missing or unknown key (when CLIPSHOT_METRICS_REQUIRE_KEY=true).")})
async def metrics(request: Request, registry: MetricsDep, _: MetricsAccessDep) -> Response:
    """Job counts are read at scrape time, so the gauge is never stale."""
    body, content_type = registry.scrape(getattr(request.app.state, "job_store", None))
    return Response(body, media_type=content_type)
