"""Product (category) routes: register from a few good photos, fine-tune, inspect, activate/roll back, delete.

Auth: every mutating route needs an **admin** key. The read routes (``GET /v1/categories``,
``GET /v1/categories/{category}``) accept a **client** key too: a production line may check that its
product exists and which version serves it, and manifests hold no secrets (shot hashes, metrics).
Handlers stay thin: all rules live in ``CategoryService`` (``app.state.category_service``).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Depends, File, Form, Path, Request, UploadFile

from app.api.deps import AdminDep, ClientDep, SettingsDep
from app.schemas import (
    CategoryDeleted,
    CategoryDetail,
    CategoryList,
    CategorySummary,
    FinetuneRequest,
    ShotsRegistered,
)
from app.services.job_store import Job
from app.services.registry import CategoryService

router = APIRouter(prefix="/v1/categories", tags=["categories"])


def get_category_service(request: Request) -> CategoryService:
    """The app's ``CategoryService`` (``app.state.category_service``)."""
    return request.app.state.category_service


CategoriesDep = Annotated[CategoryService, Depends(get_category_service)]
VersionPath = Annotated[int, Path(ge=1, description="Version number (1, 2, ...).")]


@router.post("/{category}/shots", status_code=201, response_model=ShotsRegistered)
async def register_shots(
    category: str,
    _: AdminDep,
    service: CategoriesDep,
    settings: SettingsDep,
    files: Annotated[list[UploadFile] | None, File(description="1-16 photos of GOOD parts.")] = None,
    description: Annotated[str | None, Form(max_length=200, description="What the product is (prompts).")] = None,
    finetune: Annotated[bool, Form(description="Start a background fine-tune (CLIP backbones).")] = True,
) -> ShotsRegistered:
    """Register a product or add shots: the memory adapter over ALL its shots serves as soon as this returns.

    Admin only. Nothing is written unless every file and limit checks out.
    """
    uploads = files or []
    # Read at most one byte past the limit: enough for decode_image to answer 413 without buffering more.
    data = [(f.filename or "", await f.read(settings.max_upload_bytes + 1)) for f in uploads]
    result = await service.register(category, data, description=description or None, finetune=finetune)
    return ShotsRegistered(category=result.category, version=result.version, job_id=result.job_id,
                           shots=result.shots, added=result.added, warnings=result.warnings)


@router.post("/{category}/finetune", status_code=202, response_model=Job)
def start_finetune(
    category: str, _: AdminDep, service: CategoriesDep, body: Annotated[FinetuneRequest | None, Body()] = None
) -> Job:
    """Fine-tune the category on its stored shots as a background job; poll ``GET /v1/jobs/{id}``. Admin only."""
    params = (body or FinetuneRequest()).model_dump(exclude_none=True)
    return service.finetune(category, params)


@router.get("", response_model=CategoryList)
def list_categories(_: ClientDep, service: CategoriesDep) -> CategoryList:
    """Every product with its active version, versions and shot count. Client or admin key."""
    return CategoryList(categories=[CategorySummary(**c) for c in service.list_all()])


@router.get("/{category}", response_model=CategoryDetail)
def get_category(category: str, _: ClientDep, service: CategoriesDep) -> CategoryDetail:
    """One product's versions with their manifests' key facts. Client or admin key."""
    return CategoryDetail.model_validate(service.detail(category))


@router.delete("/{category}", response_model=CategoryDeleted)
async def delete_category(category: str, _: AdminDep, service: CategoriesDep) -> CategoryDeleted:
    """Remove a product with all versions and shots; its active job is cancelled first. Admin only."""
    job_id = await service.delete(category)
    return CategoryDeleted(category=category, cancelled_job_id=job_id)


@router.post("/{category}/versions/{version}/activate", response_model=CategorySummary)
async def activate_version(category: str, version: VersionPath, _: AdminDep,
                           service: CategoriesDep) -> CategorySummary:
    """Serve another stored version from the next request on (promotion or rollback). Admin only."""
    return CategorySummary(**await service.activate(category, version))
