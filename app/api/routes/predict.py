"""Prediction endpoints: thin HTTP adapters over ``InferenceService``."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Path, Query, UploadFile

from app.api.deps import ClientDep, InferenceDep
from app.api.responses import errors
from app.errors import ClipshotHTTPError
from app.schemas import HeatmapMode, PredictResponse

API_PREFIX = "/v1"
# Full prefix on the router itself: nested include prefixes do not reach scope["route"].path (metrics label).
router = APIRouter(prefix=API_PREFIX, tags=["predict"])

RESPONSES = errors(
    400, 401, 404, 409, 413, 415, 422, 503,
    e400="Corrupt or empty image, or an image the category's geometry does not fit (smaller than its ROI).",
    e404="Unknown category, or no active adapter version (and no generic bundle for `/v1/predict`).",
    e409="Adapter incompatible with the backbone, or zero-shot without a CLIP backbone.",
    e422="Invalid parameters (e.g. unknown `heatmap` value).",
)
_HEATMAP_DOC = "`png` (overlay on the input, default), `raw` (float16 grid at model resolution) or `none`."
Files = Annotated[list[UploadFile], File(description="1 to CLIPSHOT_MAX_PREDICT_IMAGES image files.")]
HeatmapQuery = Annotated[HeatmapMode | None, Query(alias="heatmap", description=_HEATMAP_DOC)]
HeatmapForm = Annotated[HeatmapMode | None, Form(alias="heatmap", description=_HEATMAP_DOC)]
_OBJECT_DOC = "Object name for handcrafted CLIP prompts (e.g. `bottle`); omit for the generic bundle."
ObjectQuery = Annotated[str | None, Query(alias="object", max_length=64, description=_OBJECT_DOC)]
ObjectForm = Annotated[str | None, Form(alias="object", max_length=64, description=_OBJECT_DOC)]


def _one(name: str, query: str | None, form: str | None, default: str | None) -> str | None:
    """A parameter may come as query or form field; both at once must agree."""
    if query is not None and form is not None and query != form:
        raise ClipshotHTTPError(f"`{name}` given twice with different values ({query!r} vs {form!r})",
                                code="validation_error", status_code=422)
    return query if query is not None else form if form is not None else default


@router.post("/categories/{category}/predict", response_model=PredictResponse, responses=RESPONSES,
             summary="Score images against a product's active adapter")
async def predict_category(
    category: Annotated[str, Path(description="Product category (lowercase slug).")],
    files: Files,
    _: ClientDep,
    inference: InferenceDep,
    heatmap_query: HeatmapQuery = None,
    heatmap_form: HeatmapForm = None,
) -> PredictResponse:
    """Few-shot prediction; each answer names the adapter version that produced it."""
    heatmap = _one("heatmap", heatmap_query, heatmap_form, "png")
    return await inference.predict_category(category, files, heatmap)  # type: ignore[arg-type]


@router.post("/predict", response_model=PredictResponse, responses=RESPONSES,
             summary="Zero-shot prediction without a registered product")
async def predict_zero_shot(
    files: Files,
    _: ClientDep,
    inference: InferenceDep,
    heatmap_query: HeatmapQuery = None,
    heatmap_form: HeatmapForm = None,
    object_query: ObjectQuery = None,
    object_form: ObjectForm = None,
) -> PredictResponse:
    """Generic bundle, or handcrafted prompts for ``object`` (CLIP backbones only)."""
    heatmap = _one("heatmap", heatmap_query, heatmap_form, "png")
    object_name = _one("object", object_query, object_form, None)
    return await inference.predict_zero_shot(files, heatmap, object_name)  # type: ignore[arg-type]
