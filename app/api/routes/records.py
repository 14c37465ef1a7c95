"""The inspection record and the audit log over HTTP: list with filters and cursors, export as CSV, delete by age.

Auth: the record is the line's own history, so **client** keys may read it (like the product detail); deleting
(a privacy request) and the audit log need an **admin** key. Inspections outlive their product: a deleted
product's record stays readable and deletable until retention or a ``DELETE`` removes it. The logic lives in
``app.records``.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse

from app.api.audit import AUDITED
from app.api.deps import AdminDep, AuthFirstRoute, ClientDep
from app.api.responses import errors
from app.api.routes.categories import CategoryPath
from app.categories.service import CategoryService
from app.records.audit import AuditFilter
from app.records.inspections import COLUMNS, InspectionFilter
from app.records.models import AuditPage, InspectionPage, InspectionsDeleted
from app.records.pages import MAX_PAGE, time_text
from app.records.service import RecordService

router = APIRouter(prefix="/v1", tags=["records"], route_class=AuthFirstRoute)
CSV_COLUMNS = ("id", *COLUMNS)


def get_records(request: Request) -> RecordService:
    """The app's ``RecordService`` (``app.state.records``)."""
    return request.app.state.records


RecordsDep = Annotated[RecordService, Depends(get_records)]
Since = Annotated[datetime | None, Query(description="Only at or after this time (ISO 8601; no zone = UTC).")]
Until = Annotated[datetime | None, Query(description="Only before this time (ISO 8601; no zone = UTC).")]
Cursor = Annotated[str | None, Query(max_length=200, description="`next_cursor` of the previous page.")]
Limit = Annotated[int, Query(ge=1, le=MAX_PAGE, description="Most rows in this page.")]


def _text(moment: datetime | None) -> str | None:
    return None if moment is None else time_text(moment)


def inspection_filter(
    verdict: Annotated[Literal["normal", "anomalous", "unknown"] | None, Query(description="Only this verdict.")]
    = None,
    since: Since = None,
    until: Until = None,
    part_id: Annotated[str | None, Query(max_length=128, description="Only this part id.")] = None,
    line: Annotated[str | None, Query(max_length=128, description="Only this line.")] = None,
    camera: Annotated[str | None, Query(max_length=128, description="Only this camera.")] = None,
    version: Annotated[int | None, Query(ge=1, description="Only this adapter version.")] = None,
    min_score: Annotated[float | None, Query(allow_inf_nan=False, description="Only scores >= this.")] = None,
    max_score: Annotated[float | None, Query(allow_inf_nan=False, description="Only scores <= this.")] = None,
) -> InspectionFilter:
    """The listing's filters from the query string (shared by the JSON and CSV forms)."""
    return InspectionFilter(verdict=verdict, since=_text(since), until=_text(until), part_id=part_id, line=line,
                            camera=camera, version=version, min_score=min_score, max_score=max_score)


FilterDep = Annotated[InspectionFilter, Depends(inspection_filter)]


def _csv(records: RecordService, category: str, filters: InspectionFilter) -> StreamingResponse:
    def lines() -> Iterator[str]:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for count, row in enumerate(records.inspections.iter_all(category, filters), 1):
            writer.writerow(row)
            if count % 500 == 0:
                yield buffer.getvalue()
                buffer.seek(0)
                buffer.truncate()
        yield buffer.getvalue()

    return StreamingResponse(lines(), media_type="text/csv; charset=utf-8",
                             headers={"Content-Disposition": f'attachment; filename="{category}-inspections.csv"'})


@router.get("/categories/{category}/inspections", response_model=InspectionPage,
            summary="A product's recorded inspections", responses={
                200: {"content": {"text/csv": {}}, "description": "JSON page, or CSV of every match (`format=csv`)."},
                **errors(400, 401, 422, e400="Invalid category name or cursor.")})
def list_inspections(
    category: CategoryPath, _: ClientDep, records: RecordsDep, filters: FilterDep,
    cursor: Cursor = None, limit: Limit = 100,
    format: Annotated[Literal["json", "csv"], Query(description="`csv`: every match as one CSV file "
                                                    "(no pages).")] = "json",
) -> InspectionPage | StreamingResponse:
    """Newest first, filtered; follow `next_cursor` for older pages. Client or admin key."""
    name = CategoryService.name(category)
    if format == "csv":
        return _csv(records, name, filters)
    rows, next_cursor = records.inspections.list(name, filters, cursor=cursor, limit=limit)
    return InspectionPage(inspections=rows, next_cursor=next_cursor)


@router.get("/categories/{category}/inspections.csv", response_class=StreamingResponse,
            summary="A product's recorded inspections as CSV",
            responses={200: {"content": {"text/csv": {}}, "description": "Every match, newest first."},
                       **errors(400, 401, 422)})
def export_inspections(category: CategoryPath, _: ClientDep, records: RecordsDep,
                       filters: FilterDep) -> StreamingResponse:
    """The same filters as the listing; one row per inspection, header first. Client or admin key."""
    return _csv(records, CategoryService.name(category), filters)


@router.delete("/categories/{category}/inspections", dependencies=AUDITED, response_model=InspectionsDeleted,
               summary="Delete a product's inspections older than a time", responses=errors(400, 401, 403, 422))
def delete_inspections(
    category: CategoryPath, _: AdminDep, records: RecordsDep,
    before: Annotated[datetime, Query(description="Delete inspections (and their images) older than this (ISO "
                                      "8601; no zone = UTC).")],
) -> InspectionsDeleted:
    """For privacy requests and clean-ups: rows and kept images go; the audit log records who did it. Admin only."""
    name, cutoff = CategoryService.name(category), time_text(before)
    return InspectionsDeleted(category=name, before=cutoff, deleted=records.inspections.delete_before(name, cutoff))


@router.get("/audit", response_model=AuditPage, summary="Who changed what", responses=errors(400, 401, 403, 422))
def list_audit(
    _: AdminDep, records: RecordsDep,
    category: Annotated[str | None, Query(max_length=64, description="Only this product.")] = None,
    action: Annotated[str | None, Query(max_length=64, description="Only this action (e.g. `threshold`).")] = None,
    key_name: Annotated[str | None, Query(max_length=64, description="Only changes by this key.")] = None,
    since: Since = None, until: Until = None, cursor: Cursor = None, limit: Limit = 100,
) -> AuditPage:
    """Every admin change, newest first, with the key's name and the versions before and after. Admin only."""
    filters = AuditFilter(category=category, action=action, key_name=key_name, since=_text(since),
                          until=_text(until))
    events, next_cursor = records.audit.list(filters, cursor=cursor, limit=limit)
    return AuditPage(events=events, next_cursor=next_cursor)
