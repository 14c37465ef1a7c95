"""Prediction endpoints: thin HTTP adapters over ``InferenceService``.

``heatmap``, ``heatmap_size`` and ``object`` are query parameters in the API description; ``heatmap`` and
``object`` are also read from a multipart form field of that name (older clients send them there), without
listing them twice in the schema. Both at once must agree.
"""

from __future__ import annotations

from typing import Annotated, cast, get_args

from fastapi import APIRouter, File, Path, Query, Request, UploadFile

from app.api.deps import AuthFirstRoute, ClientDep, InferenceDep
from app.api.line_results import published
from app.api.responses import CATEGORY_DOC, CATEGORY_SCHEMA, errors
from app.errors import ClipshotHTTPError
from app.schemas.prediction import HeatmapMode, PredictResponse
from app.serving.heatmap import DEFAULT_MAX_SIDE as MAX_HEATMAP_SIZE

API_PREFIX = "/v1"
PINNED_VERSION_SCOPE = "clipshot.pinned_version"
# Full prefix on the router itself: nested include prefixes do not reach scope["route"].path (metrics label).
router = APIRouter(prefix=API_PREFIX, tags=["predict"], route_class=AuthFirstRoute)
DEFAULT_HEATMAP = "jpeg"
HEATMAP_MODES = get_args(HeatmapMode)

CATEGORY_RESPONSES = errors(
    400, 401, 404, 409, 413, 415, 422, 503,
    e400="Corrupt or empty image, or an image the category's geometry does not fit (smaller than its ROI).",
    e404="Unknown category, or no active adapter version.",
    e409="The active adapter was built for another backbone.",
    e422="Invalid parameters (e.g. unknown `heatmap` value, `heatmap_size` out of range).",
)
# No 404 here: without a generic bundle a CLIP service answers with handcrafted prompts, a non-CLIP one with 409.
ZERO_SHOT_RESPONSES = errors(
    401, 409, 413, 415, 422, 503,
    e409="Zero-shot needs a CLIP backbone (text prompts); this service runs a memory-only backbone.",
    e422="Invalid parameters (e.g. unknown `heatmap` value, `heatmap_size` out of range, bad `object`).",
)
_HEATMAP_DOC = ("`jpeg` (default): the input with the region above the threshold tinted and outlined, normal "
                "pixels untouched; `png`: the same overlay, lossless; `mask`: 1-bit PNG of score > threshold, plus "
                "`regions`; `regions`: boxes with area % and peak score only; `raw`: float16 grid at model "
                "resolution; `none`. May also be sent as a form field.")
_SIZE_DOC = f"Longer side in pixels of the returned picture (default: the input's, at most {MAX_HEATMAP_SIZE})."
Files = Annotated[list[UploadFile], File(description="1 to CLIPSHOT_MAX_PREDICT_IMAGES image files.")]
HeatmapQuery = Annotated[HeatmapMode | None, Query(alias="heatmap", description=_HEATMAP_DOC)]
SizeQuery = Annotated[int | None, Query(alias="heatmap_size", ge=16, le=MAX_HEATMAP_SIZE, description=_SIZE_DOC)]
_OBJECT_DOC = ("Object name for handcrafted CLIP prompts (e.g. `bottle`); omit for the generic bundle. May also "
               "be sent as a form field.")
ObjectQuery = Annotated[str | None, Query(alias="object", max_length=64, description=_OBJECT_DOC)]


async def _one(request: Request, name: str, query: str | None, default: str | None,
               allowed: tuple[str, ...] | None = None) -> str | None:
    """The query value or the form field of the same name (the form is already parsed and cached)."""
    form = (await request.form()).get(name)
    if form is not None and not isinstance(form, str):
        raise ClipshotHTTPError(f"`{name}` must be a text field, not a file", code="validation_error",
                                status_code=422)
    if allowed is not None and form is not None and form not in allowed:
        raise ClipshotHTTPError(f"`{name}` must be one of {', '.join(allowed)}, got {form!r}",
                                code="validation_error", status_code=422)
    if query is not None and form is not None and query != form:
        raise ClipshotHTTPError(f"`{name}` given twice with different values ({query!r} vs {form!r})",
                                code="validation_error", status_code=422)
    return query if query is not None else form if form is not None else default


@router.post("/categories/{category}/predict", response_model=PredictResponse, responses=CATEGORY_RESPONSES,
             summary="Score images against a product's active adapter")
async def predict_category(
    category: Annotated[str, Path(description=CATEGORY_DOC, json_schema_extra=CATEGORY_SCHEMA)],
    files: Files,
    _: ClientDep,
    inference: InferenceDep,
    request: Request,
    heatmap_query: HeatmapQuery = None,
    heatmap_size: SizeQuery = None,
) -> PredictResponse:
    """Few-shot prediction; each answer names the adapter version that produced it."""
    # FastAPI checks the query and _one the form field against HEATMAP_MODES, HeatmapMode's values
    heatmap = cast(HeatmapMode, await _one(request, "heatmap", heatmap_query, DEFAULT_HEATMAP, HEATMAP_MODES))
    # Set only by the Ray Serve replica (in the ASGI scope, out of reach of HTTP clients): the version its
    # router resolved and routed on; plain `clipshot serve` resolves the active version here instead.
    pinned = request.scope.get(PINNED_VERSION_SCOPE)
    return await published(request, inference.predict_category(category, files, heatmap,
                                                               heatmap_size=heatmap_size, version=pinned))


@router.post("/predict", response_model=PredictResponse, responses=ZERO_SHOT_RESPONSES,
             summary="Zero-shot prediction without a registered product")
async def predict_zero_shot(
    files: Files,
    _: ClientDep,
    inference: InferenceDep,
    request: Request,
    heatmap_query: HeatmapQuery = None,
    object_query: ObjectQuery = None,
    heatmap_size: SizeQuery = None,
) -> PredictResponse:
    """Generic bundle, or handcrafted prompts for ``object`` (CLIP backbones only)."""
    # FastAPI checks the query and _one the form field against HEATMAP_MODES, HeatmapMode's values
    heatmap = cast(HeatmapMode, await _one(request, "heatmap", heatmap_query, DEFAULT_HEATMAP, HEATMAP_MODES))
    object_name = await _one(request, "object", object_query, None)
    return await published(request, inference.predict_zero_shot(files, heatmap, object_name,
                                                                heatmap_size=heatmap_size))
