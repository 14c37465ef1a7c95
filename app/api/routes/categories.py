"""Product (category) routes: register from a few good photos, fine-tune, inspect, activate/roll back, delete.

Auth: every mutating route needs an **admin** key. The read routes (``GET /v1/categories``,
``GET /v1/categories/{category}``) accept a **client** key too: a production line may check that its
product exists and which version serves it, and manifests hold no secrets (shot hashes, metrics).
Handlers stay thin: all rules live in ``CategoryService`` (``app.state.category_service``).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Depends, File, Form, Path, Request, UploadFile
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from app.api.audit import AUDITED
from app.api.deps import AdminDep, AuthFirstRoute, ClientDep, PixelBudgetDep, SettingsDep
from app.api.refit_route import ACCEPTED, RefitsDep, WaitQuery, start_refit
from app.api.responses import CATEGORY_DOC, CATEGORY_SCHEMA, errors
from app.categories.geometry import GeometryRequest
from app.categories.service import CategoryService, Registration
from app.errors import ClipshotHTTPError
from app.jobs.job_store import Job
from app.jobs.refit_jobs import RefitProgress
from app.schemas import (
    OBJECT_NAME_PATTERN,
    OBJECT_NAME_RULE,
    CategoryDeleted,
    CategoryDetail,
    CategoryList,
    CategorySummary,
    FinetuneRequest,
    ShotsRegistered,
    VersionPins,
)
from app.serving.pixel_budget import fit_admitted, upload_pixels

router = APIRouter(prefix="/v1/categories", tags=["categories"], route_class=AuthFirstRoute)


def get_category_service(request: Request) -> CategoryService:
    """The app's ``CategoryService`` (``app.state.category_service``)."""
    return request.app.state.category_service


CategoriesDep = Annotated[CategoryService, Depends(get_category_service)]
VersionPath = Annotated[int, Path(ge=1, description="Version number (1, 2, ...).")]
CategoryPath = Annotated[str, Path(description=CATEGORY_DOC, json_schema_extra=CATEGORY_SCHEMA)]


@router.post("/{category}/shots", dependencies=AUDITED, status_code=201, response_model=ShotsRegistered,
             summary="Register a product, or add good shots to it",
             responses={**errors(400, 401, 403, 409, 413, 415, 422, 503,
                              e400="Invalid name, corrupt or empty image, too few or too many shots, "
                                   "geometry that does not fit the shots (ROI outside an image, tiles too large).",
                              e409="An image is a confirmed defect, or another writer changed the active version "
                                   "meanwhile (`version_conflict`: retry).",
                              e422="Invalid form fields (e.g. a description outside its pattern)."), **ACCEPTED})
async def register_shots(
    category: CategoryPath,
    _: AdminDep,
    service: CategoriesDep,
    settings: SettingsDep,
    budget: PixelBudgetDep,
    refits: RefitsDep,
    wait: WaitQuery = True,
    files: Annotated[list[UploadFile] | None, File(description="Photos of GOOD parts: CLIPSHOT_MIN_SHOTS to "
                                                                 "CLIPSHOT_MAX_SHOTS (default 1-16).")] = None,
    description: Annotated[str | None, Form(max_length=200, description="What the product is, for the prompts: "
                                            f"{OBJECT_NAME_RULE} (leading and trailing spaces are dropped).",
                                            json_schema_extra={"pattern": OBJECT_NAME_PATTERN})] = None,
    finetune: Annotated[bool, Form(description="Start a background fine-tune (CLIP backbones).")] = True,
    resize: Annotated[Literal["auto", "squash", "letterbox", "native"] | None, Form(
        description="Fit into the model input: squash (stretch), letterbox (keep aspect, pad), native (keep "
                    "aspect, non-square input); auto = native when the shots' aspect is >= 1.5:1, else squash."),
    ] = None,
    roi: Annotated[str | None, Form(max_length=80, description="Region of interest `left,top,right,bottom` in "
                                    "image pixels (right/bottom exclusive); the rest of the image is ignored.")] = None,
    tile: Annotated[int | None, Form(ge=0, le=100_000, description="Square tile side in image pixels for "
                    "high-resolution frames (each tile at full model resolution); 0 = no tiles; omitted with "
                    "the other geometry fields = auto (tiles when the frame is over 4x the model input).")] = None,
    tile_overlap: Annotated[float | None, Form(ge=0, lt=0.9, description="Overlap of neighbouring tiles "
                                               "(fraction, default 0.25).")] = None,
) -> ShotsRegistered | JSONResponse:
    """Register a product or add shots: the memory adapter over ALL its shots serves as soon as this returns.

    Geometry: give any of resize/roi/tile/tile_overlap to set it (the rest auto); give none to keep the
    category's stored geometry, or on a new category to choose it from the shots. Admin only. Nothing is
    written unless every file, limit and the geometry checks out. ``wait=false``: 202 with a `register` job.
    """
    description = _description(description)
    uploads = files or []
    # Read at most one byte past the limit: enough for decode_image to answer 413 without buffering more.
    data = [(f.filename or "", await f.read(settings.max_upload_bytes + 1)) for f in uploads]
    geometry = GeometryRequest.parse(resize=resize, roi=roi, tile=tile, tile_overlap=tile_overlap)
    pixels = await run_in_threadpool(upload_pixels, data, max_pixels=settings.max_image_pixels,
                                     max_bytes=settings.max_upload_bytes)
    if not wait:
        async def refit(progress: RefitProgress) -> dict[str, Any]:
            return _registered(await service.register(category, data, description=description, finetune=finetune,
                                                      geometry=geometry, progress=progress)).model_dump(mode="json")

        params = {"images": len(data), "finetune": finetune, **({"description": description} if description else {})}
        return await start_refit(refits, budget, pixels, kind="register", params=params, refit=refit,
                                 check=lambda: service.check_register(category, data, geometry))
    async with fit_admitted(budget, pixels):  # 413 / 503 from the headers, before a pixel is decoded
        result = await service.register(category, data, description=description, finetune=finetune,
                                        geometry=geometry)
    return _registered(result)


def _registered(result: Registration) -> ShotsRegistered:
    return ShotsRegistered(category=result.category, version=result.version, job_id=result.job_id,
                           shots=result.shots, added=result.added, warnings=result.warnings,
                           decision=result.decision, geometry=result.geometry)


def _description(text: str | None) -> str | None:
    """The stripped description, or a 422 naming the rule (a regex in the message helps nobody on the line)."""
    text = (text or "").strip()
    if text and not re.fullmatch(OBJECT_NAME_PATTERN, text):
        raise ClipshotHTTPError(f"description must be {OBJECT_NAME_RULE}", code="invalid_description",
                                status_code=422)
    return text or None


@router.post("/{category}/finetune", dependencies=AUDITED,
             status_code=202, response_model=Job, summary="Start a background fine-tune",
             responses=errors(400, 401, 403, 404, 409, 422,
                              e400="Invalid category name.",
                              e409="The backbone cannot be fine-tuned (no CLIP text tower), a fine-tune is already "
                                   "queued or running for the category, or it has no stored shots."))
async def start_finetune(
    category: CategoryPath, _: AdminDep, service: CategoriesDep,
    body: Annotated[FinetuneRequest | None, Body()] = None,
) -> Job:
    """Fine-tune the category on its stored shots as a background job; poll ``GET /v1/jobs/{id}``. Admin only."""
    params = (body or FinetuneRequest()).model_dump(exclude_none=True)
    return await service.finetune(category, params)


@router.get("", response_model=CategoryList, summary="List products", responses=errors(401))
def list_categories(_: ClientDep, service: CategoriesDep) -> CategoryList:
    """Every product with its active version, versions and shot count. Client or admin key."""
    return CategoryList(categories=[CategorySummary(**c) for c in service.list_all()])


@router.get("/{category}", response_model=CategoryDetail, summary="One product's versions",
            responses=errors(400, 401, 404, 422))
def get_category(category: CategoryPath, _: ClientDep, service: CategoriesDep) -> CategoryDetail:
    """One product's versions with their manifests' key facts, and the active `decision`. Client or admin key."""
    return CategoryDetail.model_validate(service.detail(category))


@router.delete("/{category}", dependencies=AUDITED, response_model=CategoryDeleted, summary="Delete a product",
               responses=errors(400, 401, 403, 404, 409, 422, e409="Its fine-tune job is still stopping; retry."))
async def delete_category(category: CategoryPath, _: AdminDep, service: CategoriesDep) -> CategoryDeleted:
    """Remove a product with all versions and shots; its active job is cancelled first. Admin only."""
    job_id = await service.delete(category)
    return CategoryDeleted(category=category, cancelled_job_id=job_id)


@router.post("/{category}/versions/{version}/activate", dependencies=AUDITED, response_model=CategorySummary,
             summary="Serve another stored version (promote or roll back)",
             responses=errors(400, 401, 403, 404, 409, 422,
                              e409="The version's bundle is corrupt or was built for another backbone, or another "
                                   "writer changed the active version meanwhile (`version_conflict`: retry)."))
async def activate_version(category: CategoryPath, version: VersionPath, _: AdminDep,
                           service: CategoriesDep) -> CategorySummary:
    """Serve another stored version from the next request on (promotion or rollback). Admin only."""
    return CategorySummary(**await service.activate(category, version))


@router.put("/{category}/versions/{version}/pin", dependencies=AUDITED,
            response_model=VersionPins, summary="Keep a version",
            responses=errors(400, 401, 403, 404, 409, 422, e409="The version's manifest is unreadable."))
async def pin_version(category: CategoryPath, version: VersionPath, _: AdminDep,
                      service: CategoriesDep) -> VersionPins:
    """Pin a version so version retention (`CLIPSHOT_KEEP_VERSIONS`) never deletes it. Admin only."""
    return VersionPins(**await service.pin(category, version, True))


@router.delete("/{category}/versions/{version}/pin", dependencies=AUDITED,
               response_model=VersionPins, summary="Stop keeping a version",
               responses=errors(400, 401, 403, 404, 422))
async def unpin_version(category: CategoryPath, version: VersionPath, _: AdminDep,
                        service: CategoriesDep) -> VersionPins:
    """Unpin a version: retention may delete it once it is older than the versions kept. Admin only."""
    return VersionPins(**await service.pin(category, version, False))
