"""Liveness and readiness for orchestrators (always unauthenticated, outside /v1)."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from app.api.deps import AuthFirstRoute, ReadinessDep
from app.schemas import HealthResponse, ReadyResponse

router = APIRouter(tags=["health"], route_class=AuthFirstRoute)  # public: no key, no body


@router.get("/healthz", response_model=HealthResponse, summary="Process is alive")
async def healthz() -> HealthResponse:
    """No dependencies on purpose: a busy device must not get the process restarted."""
    return HealthResponse()


@router.get("/readyz", response_model=ReadyResponse, responses={503: {"model": ReadyResponse}},
            summary="Backbone loaded and a real forward pass succeeds")
async def readyz(request: Request, probe: ReadinessDep) -> JSONResponse:
    """503 until a tiny synthetic forward through the device worker succeeds (cached a few seconds)."""
    result = await probe.check()
    backbone = request.app.state.detector.backbone
    body = ReadyResponse(
        status="ready" if result.ok else "not_ready", backbone=backbone.spec, device=str(backbone.device),
        finetune=backbone.supports_text,
        checked_seconds_ago=round(time.monotonic() - result.checked_at, 3), detail=result.detail,
    )
    return JSONResponse(body.model_dump(), status_code=200 if result.ok else 503)
