"""Read routes behind the console's product page: a stored shot as a thumbnail, and the product's trend (verdict
rate and normalised-score drift per hour or day) from the inspection record next to its calibration.

Auth: **client** keys read both, like the shot list and the record they come from (hashes, counts and scores;
the pictures are the product's own reference shots). Nothing here changes state. The logic lives in
``app.categories.shot_ledger`` and ``app.records.trend``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from app.api.deps import AuthFirstRoute, ClientDep
from app.api.responses import errors
from app.api.routes.categories import CategoriesDep, CategoryPath
from app.api.routes.decisions import Sha256Path
from app.api.routes.records import RecordsDep
from app.categories import shot_ledger
from app.categories.category_edits import SHA256
from app.categories.service import CategoryService
from app.errors import BadRequestError, ConflictError, NotFoundError
from app.records import trend
from app.records.models import InspectionTrend
from app.records.pages import time_text
from model_store import StoreError

router = APIRouter(prefix="/v1/categories", route_class=AuthFirstRoute)
# A stored shot never changes under its hash; private: it is a picture of the customer's part.
_IMMUTABLE = {"Cache-Control": "private, max-age=86400, immutable"}
TrendSince = Annotated[datetime | None, Query(description="Start of the range, rounded down to its bucket (ISO 8601; "
                                             "no zone = UTC). Default: 24 hours or 30 days before `until`.")]
TrendUntil = Annotated[datetime | None, Query(description="End of the range (exclusive), rounded up to a whole bucket "
                                             "(ISO 8601; no zone = UTC). Default: now.")]
THUMBNAIL_MAX = 512  # px: a grid of these is what the page shows; larger is what GET .../shots is not for


@router.get("/{category}/shots/{sha256}/thumbnail", tags=["categories"], response_class=Response,
            summary="A stored shot as a thumbnail",
            responses={200: {"content": {"image/jpeg": {}}, "description": "JPEG, upright, longer side <= size."},
                       **errors(400, 401, 404, 409, 422, e400="Invalid category name or sha256.",
                                e404="The active version lists no shot or confirmed defect with that hash.",
                                e409="The version lists it but its file is missing from the store.")})
async def shot_thumbnail(
    category: CategoryPath, sha256: Sha256Path, _: ClientDep, service: CategoriesDep,
    size: Annotated[int, Query(ge=16, le=THUMBNAIL_MAX,
                               description=f"Longer side in pixels (16-{THUMBNAIL_MAX}).")] = 256,
) -> Response:
    """A small JPEG of one image the active version lists (from `GET .../shots`, or a confirmed defect), for
    the product page. Client or admin key."""
    name = CategoryService.name(category)
    if not SHA256.fullmatch(sha256):
        raise BadRequestError(f"invalid sha256 {sha256!r}: 64 lowercase hex digits", code="invalid_sha256")
    try:
        data = await run_in_threadpool(shot_ledger.shot_thumbnail, service.store, name, sha256, size)
    except StoreError as exc:
        raise ConflictError(str(exc), code="shots_missing") from exc
    if data is None:
        raise NotFoundError(f"{name!r} has no shot {sha256} in its active version (see GET .../shots)",
                            code="shot_not_found")
    return Response(data, media_type="image/jpeg", headers=_IMMUTABLE)


@router.get("/{category}/inspections/trend", tags=["records"], response_model=InspectionTrend,
            summary="Verdict rate and score drift over time",
            responses=errors(400, 401, 422, e400="Invalid category name, or a range that is empty or longer "
                                                 f"than {trend.MAX_BUCKETS} buckets (`invalid_range`)."))
async def inspection_trend(
    category: CategoryPath, _: ClientDep, records: RecordsDep, service: CategoriesDep,
    bucket: Annotated[trend.Bucket, Query(description="`hour` or `day` (UTC).")] = "hour",
    since: TrendSince = None, until: TrendUntil = None,
) -> InspectionTrend:
    """Per bucket of the recorded inspections: counts, the anomalous rate and the normalised score's mean, 95th
    percentile and maximum, with the active version's calibration normalised the same way as the reference to
    read drift against. The range is rounded out to whole buckets; it defaults to the last 24 hours (`hour`)
    or 30 days (`day`). A deleted product's record still answers (reference null). Client or admin key."""
    name = CategoryService.name(category)
    start, end = trend.span(bucket, since, until)
    buckets = await run_in_threadpool(trend.trend, records.db, name, bucket, start, end)
    ledger = await run_in_threadpool(shot_ledger.current_ledger, service.store, name)
    calibration = None if ledger.manifest is None else ledger.manifest.adapter.get("calibration")
    return InspectionTrend(category=name, bucket=bucket, since=time_text(start), until=time_text(end),
                           buckets=buckets, reference=trend.reference(calibration, ledger.active))

