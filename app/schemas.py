"""Pydantic models of every HTTP body the service sends, shared by routes and the OpenAPI docs.

One module so clients see one vocabulary; grouped by area (keep new models in their section,
request bodies next to the responses they produce). Errors use ``app.errors``'s JSON shape.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.services.job_store import Job

HeatmapMode = Literal["png", "raw", "none"]

# --- prediction ------------------------------------------------------------------------------


class Heatmap(BaseModel):
    """An anomaly map, either as a picture (png) or as numbers (raw)."""

    encoding: Literal["png", "raw"] = Field(
        description="`png`: colour-mapped overlay on the input image, at the input's size. "
        "`raw`: the score grid over the whole input at about model resolution (resize it to the input's size), "
        "as little-endian float16; outside a category's ROI it is 0."
    )
    data: str = Field(description="Base64 of the PNG file or of the float16 bytes (row-major).")
    shape: list[int] = Field(description="[height, width] of the PNG or of the raw grid.")
    dtype: Literal["float16"] | None = Field(None, description="Element type of `raw` data (little-endian).")
    vmin: float | None = Field(None, description="Score mapped to the coldest colour (png).")
    vmax: float | None = Field(None, description="Score mapped to the hottest colour (png); threshold = midpoint.")


class StageTimings(BaseModel):
    """Where this image's time went (milliseconds); forward is shared by everything in its batch."""

    decode_ms: float = Field(description="Checking and decoding the uploaded bytes to RGB.")
    preprocess_ms: float = Field(description="Resizing and normalising (for the whole request).")
    queue_ms: float = Field(description="Waiting for the batch to fill and for the device.")
    forward_ms: float = Field(description="Backbone + scoring on the device, for the whole batch.")
    postprocess_ms: float = Field(description="Verdict and heatmap encoding.")


class ImagePrediction(BaseModel):
    """The verdict for one uploaded image."""

    filename: str | None = Field(description="Name of the uploaded file, as sent.")
    sha256: str = Field(description="SHA-256 of the uploaded file's bytes: ties the verdict to the exact image "
                        "for audit trails.")
    category: str = Field(description="Product category (or `generic` / `zero-shot` for /v1/predict).")
    adapter_version: int | None = Field(
        description="Stored adapter version that scored this image; null for handcrafted zero-shot prompts."
    )
    score: float = Field(description="Image anomaly score; higher = more anomalous.")
    threshold: float | None = Field(description="Calibrated decision threshold; null when uncalibrated.")
    is_anomalous: bool | None = Field(description="score > threshold; null when there is no threshold.")
    heatmap: Heatmap | None = Field(None, description="Anomaly map in the requested encoding; null for `none`.")
    batch_size: int = Field(description="Images in the device batch this image ran in.")
    timings: StageTimings = Field(description="Where this image's time went in the server.")


class PredictResponse(BaseModel):
    """Predictions in upload order."""

    category: str = Field(description="Product category (or `generic` / `zero-shot` for /v1/predict).")
    adapter_version: int | None = Field(description="Adapter version used for every image of the request.")
    adapter_source: Literal["category", "generic", "handcrafted"] = Field(
        description="`category`: the product's active bundle; `generic`: the stored zero-shot bundle; "
        "`handcrafted`: CLIP prompts built on the fly (no bundle stored)."
    )
    predictions: list[ImagePrediction] = Field(description="One per uploaded file, in upload order.")


# --- health ----------------------------------------------------------------------------------


class HealthResponse(BaseModel):
    """Liveness: the process serves HTTP."""

    status: Literal["ok"] = Field("ok", description="Always `ok` while the process answers.")


class ReadyResponse(BaseModel):
    """Readiness: the backbone is loaded and a real forward pass just succeeded on the device."""

    status: Literal["ready", "not_ready"] = Field(description="`ready` once a forward pass succeeded.")
    backbone: str = Field(description="Backbone spec the service runs.")
    device: str = Field(description="Torch device it runs on, e.g. `cuda:0`.")
    checked_seconds_ago: float = Field(description="Age of the cached probe result.")
    detail: str | None = Field(None, description="Why the service is not ready.")


# --- categories and jobs (app/api/routes/categories.py, app/api/routes/jobs.py) --------------------------


class ShotsRegistered(BaseModel):
    """Answer to ``POST /v1/categories/{category}/shots``: the version serving now and the fine-tune job."""

    category: str = Field(description="The product category.")
    version: int = Field(description="New active version: the memory adapter over ALL stored shots.")
    job_id: str | None = Field(description="Fine-tune job started for it, or null (disabled, non-CLIP, busy).")
    shots: int = Field(description="Distinct shots the category now holds.")
    added: int = Field(description="Shots this upload added (identical images are stored once).")
    warnings: list[str] = Field(default_factory=list, description="Things the engineer should know.")
    geometry: dict[str, Any] = Field(default_factory=dict, description=(
        "How the category's images are cut for the model: resize mode, model frame [height, width], roi "
        "[left, top, right, bottom], tiles [rows, cols] with tile_size as fractions of the ROI, and the rule "
        "that chose them."))


class FinetuneRequest(BaseModel):
    """Optional budget of ``POST /v1/categories/{category}/finetune``; omitted fields use the settings."""

    model_config = ConfigDict(extra="forbid")

    steps: int | None = Field(None, ge=1, le=100_000, description="Optimisation steps (default finetune_steps).")
    seconds: float | None = Field(None, gt=0, le=86_400,
                                  description="Wall-clock budget in s (default finetune_seconds).")
    seed: int | None = Field(None, ge=0, le=2**31 - 1, description="Random seed (default 0).")


class AdapterVersionInfo(BaseModel):
    """Key facts of one stored version, read from its manifest."""

    version: int = Field(description="Version number (1, 2, ...).")
    active: bool = Field(description="Whether predictions use this version now.")
    created: datetime | None = Field(None, description="When the version was saved (UTC).")
    promotable: bool | None = Field(None, description="Memory adapters, and fine-tunes that beat them.")
    kind: str | None = Field(None, description="`memory` (no training) or `finetuned` (LoRA + prompts).")
    branches: list[str] = Field(default_factory=list, description="Scoring branches: `text`, `memory`.")
    object_name: str | None = Field(None, description="Product description used in the prompts.")
    shots: int | None = Field(None, description="Shots the version was fitted on.")
    metrics: dict[str, Any] = Field(default_factory=dict, description="Fit/validation metrics (AUROCs etc.).")
    training_seconds: float | None = Field(None, description="Time spent fine-tuning; null for memory adapters.")
    backbone: str | None = Field(None, description="Backbone spec the version was fitted on.")
    geometry: dict[str, Any] | None = Field(None, description="The version's image geometry (see registration).")
    error: str | None = Field(None, description="Set when the manifest cannot be read (the version is unusable).")


class CategorySummary(BaseModel):
    """One product in ``GET /v1/categories``."""

    category: str = Field(description="The product category.")
    active_version: int | None = Field(description="Version predictions use now; null if none is usable.")
    versions: list[int] = Field(description="Every stored version, oldest first.")
    shots: int = Field(description="Distinct good shots stored for the product.")


class CategoryList(BaseModel):
    """``GET /v1/categories``: every registered product."""

    categories: list[CategorySummary] = Field(description="Sorted by category name.")


class CategoryDetail(BaseModel):
    """``GET /v1/categories/{category}``: every version with its facts, plus the active job if any."""

    category: str = Field(description="The product category.")
    active_version: int | None = Field(description="Version predictions use now; null if none is usable.")
    shots: int = Field(description="Distinct good shots stored for the product.")
    versions: list[AdapterVersionInfo] = Field(description="Every stored version, oldest first.")
    active_job: Job | None = Field(None, description="The queued or running fine-tune, if any.")


class CategoryDeleted(BaseModel):
    """``DELETE /v1/categories/{category}``: the product, its versions and shots are gone."""

    category: str = Field(description="The deleted product category.")
    deleted: bool = Field(True, description="Always true (failures answer with an error instead).")
    cancelled_job_id: str | None = Field(None, description="The job that was cancelled first, if any.")


class JobList(BaseModel):
    """``GET /v1/jobs``: newest first."""

    jobs: list[Job] = Field(description="Newest first, at most `limit`.")
