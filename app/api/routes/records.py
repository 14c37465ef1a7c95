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
from pathlib import Path as FilePath
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import FileResponse, Response, StreamingResponse
from PIL import Image
from starlette.concurrency import run_in_threadpool

from app.api.audit import AUDITED
from app.api.deps import AdminDep, AuthFirstRoute, ClientDep, SettingsDep
from app.api.responses import errors
from app.api.routes.categories import CategoryPath
from app.categories.service import CategoryService
from app.errors import NotFoundError
from app.records.audit import AuditFilter
from app.records.images import thumbnail
from app.records.inspections import COLUMNS, InspectionFilter
from app.records.models import AuditPage, InspectionPage, InspectionsDeleted
from app.records.pages import MAX_PAGE, time_text
from app.records.service import RecordService

router = APIRouter(prefix="/v1", tags=["records"], route_class=AuthFirstRoute)
CSV_COLUMNS = ("id", *COLUMNS)
_PRIVATE = {"Cache-Control": "private, max-age=3600"}  # a kept picture never changes; it holds a part's image


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
    min_p_value: Annotated[float | None, Query(ge=0, le=1, allow_inf_nan=False, description=(
        "Only verdicts at least this unsure: `p_value` >= this (e.g. 0.05 lists the verdicts worth a second "
        "look)."))] = None,
) -> InspectionFilter:
    """The listing's filters from the query string (shared by the JSON and CSV forms)."""
    return InspectionFilter(verdict=verdict, since=_text(since), until=_text(until), part_id=part_id, line=line,
                            camera=camera, version=version, min_score=min_score, max_score=max_score,
                            min_p_value=min_p_value)


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


InspectionId = Annotated[int, Path(ge=1, description="The inspection's `id`.")]
_PICTURE = {200: {"content": {"image/jpeg": {}, "image/png": {}}, "description": "The picture."},
            **errors(400, 401, 404, 422, e404="No such inspection, or its picture was not kept (record mode "
                                                "`off`/`verdicts`, or removed by retention).")}


def _kept(records: RecordService, category: str, inspection_id: int, column: str) -> FilePath:
    path = records.inspections.kept_file(CategoryService.name(category), inspection_id, column)
    if path is None:
        raise NotFoundError(f"inspection {inspection_id} of {category} has no kept "
                            f"{'overlay' if column == 'overlay_path' else 'image'}")
    return path


@router.get("/categories/{category}/inspections/{inspection_id}/image", response_class=FileResponse,
            summary="An inspection's kept image", responses=_PICTURE)
def inspection_image(category: CategoryPath, inspection_id: InspectionId, _: ClientDep,
                     records: RecordsDep) -> FileResponse:
    """The picture as kept: the thumbnail (`record_mode=thumbnails`) or the uploaded file (`full`), e.g. to
    send it back as feedback. Client or admin key."""
    return FileResponse(_kept(records, category, inspection_id, "image_path"), headers=_PRIVATE)


@router.get("/categories/{category}/inspections/{inspection_id}/thumbnail", response_class=Response,
            summary="An inspection's image as a thumbnail", responses=_PICTURE)
async def inspection_thumbnail(category: CategoryPath, inspection_id: InspectionId, _: ClientDep,
                               records: RecordsDep, settings: SettingsDep) -> Response:
    """A JPEG at most `CLIPSHOT_RECORD_THUMBNAIL_SIZE` pixels long, for lists: the kept thumbnail as is, or one
    made from a kept full image. Client or admin key."""
    path = _kept(records, category, inspection_id, "image_path")
    size = settings.record_thumbnail_size
    if path.suffix == ".jpg" and await run_in_threadpool(_fits, path, size):
        return FileResponse(path, media_type="image/jpeg", headers=_PRIVATE)
    data = await run_in_threadpool(thumbnail, path.read_bytes(), size)
    return Response(data, media_type="image/jpeg", headers=_PRIVATE)


@router.get("/categories/{category}/inspections/{inspection_id}/overlay", response_class=FileResponse,
            summary="An inspection's kept overlay", responses=_PICTURE)
def inspection_overlay(category: CategoryPath, inspection_id: InspectionId, _: ClientDep,
                       records: RecordsDep) -> FileResponse:
    """The heatmap overlay the client was answered (thumbnail-sized in `thumbnails` mode), when the predict
    request asked for a `jpeg`/`png` heatmap and images were kept. Client or admin key."""
    return FileResponse(_kept(records, category, inspection_id, "overlay_path"), headers=_PRIVATE)


def _fits(path: FilePath, size: int) -> bool:
    with Image.open(path) as image:
        return max(image.size) <= size


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
