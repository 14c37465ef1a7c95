"""Pydantic models of every HTTP body the service sends, shared by routes and the OpenAPI docs.

One package so clients see one vocabulary; grouped by area (keep new models in their section,
request bodies next to the responses they produce). The predict answer lives in ``app.schemas.prediction``
(the serving runtime, the inspection record and the line publishers need only it); this module holds the
health, category, decision and job bodies and the product-name rule both areas share. Errors use
``app.errors``'s JSON shape.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.jobs.job_store import Job

# What a product/object name may hold: it goes into CLIP prompts, manifests and logs, so ordinary text with
# punctuation ("glass bottle, top view") but no control characters, line breaks, terminal escapes or bidi
# overrides, nor U+FFFD (bytes that were not UTF-8) (shared by the zero-shot `object` and the register
# `description`). Starts with a letter or digit.
OBJECT_NAME_PATTERN = r"^[^\W_][^\x00-\x1f\x7f-\x9f\u2028-\u202e\u2066-\u2069\ufffd]{0,63}$"
OBJECT_NAME_RULE = ("1-64 characters starting with a letter or digit; punctuation is fine, line breaks and "
                    "control characters are not")


# --- health ----------------------------------------------------------------------------------


class HealthResponse(BaseModel):
    """Liveness: the process serves HTTP."""

    status: Literal["ok"] = Field("ok", description="Always `ok` while the process answers.")


class ReadyResponse(BaseModel):
    """Readiness: the backbone is loaded and a real forward pass just succeeded on the device."""

    status: Literal["ready", "not_ready"] = Field(description="`ready` once a forward pass succeeded.")
    backbone: str = Field(description="Backbone spec the service runs.")
    device: str = Field(description="Torch device it runs on, e.g. `cuda:0`.")
    finetune: bool = Field(False, description="Whether the backbone can be fine-tuned (CLIP: text tower + LoRA); "
                           "when false, registration serves the memory adapter only and `/finetune` answers 409.")
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
    warnings: list[str] = Field(default_factory=list, description="Things the engineer should know (with 1-3 "
                                "shots: that the threshold's promises are rough guesses).")
    decision: Decision | None = Field(None, description="How the new version decides `is_anomalous`: threshold, "
                                      "expected false-alarm rate and recall, and whether the shots let it be sure.")
    geometry: dict[str, Any] = Field(default_factory=dict, description=(
        "How the category's images are cut for the model: resize mode, model frame [height, width], roi "
        "[left, top, right, bottom], tiles [rows, cols] with tile_size as fractions of the ROI, and the rule "
        "that chose them."))


class FinetuneRequest(BaseModel):
    """Optional budget of ``POST /v1/categories/{category}/finetune``; omitted fields use the settings."""

    model_config = ConfigDict(extra="forbid")  # strict ints: `"seed": false` is a client bug, not seed 0

    steps: int | None = Field(None, ge=1, le=100_000, strict=True,
                              description="Optimisation steps (default finetune_steps).")
    seconds: float | None = Field(None, gt=0, le=86_400,
                                  description="Wall-clock budget in s (default finetune_seconds).")
    seed: int | None = Field(None, ge=0, le=2**31 - 1, strict=True, description="Random seed (default 0).")


# --- decisions: threshold policy, feedback, shots ----------------------------------------------


class Decision(BaseModel):
    """The active decision rule (``score > threshold`` = anomalous) and what it is expected to do."""

    threshold: float = Field(description="Scores above this are anomalous.")
    policy: Literal["auto", "target_rate", "manual"] = Field(
        description="`auto`: the automatic rule; `target_rate`: a false-alarm rate an operator asked for; "
        "`manual`: a threshold an operator set.")
    target_false_alarm_rate: float | None = Field(description="The rate asked for (`target_rate` only).")
    expected_false_alarm_rate: float | None = Field(
        description="At most this share of good parts is flagged, with 90 % confidence, for parts that vary as the "
                    "good images did: a Clopper-Pearson bound on how many good images (shots and confirmed goods) "
                    "scored above the threshold against a memory without them, or the log-normal estimate where "
                    "larger. Null with fewer than 2 good images (no evidence for a number).")
    expected_recall: float | None = Field(
        description="Expected share of defects caught: on confirmed defects when there are any, else on "
                    "synthetic defects made from the shots; null without such evidence.")
    confident: bool = Field(description="True when `expected_false_alarm_rate` is at most 0.2; with no good image "
                                        "above the threshold that takes 11 good images.")
    note: str | None = Field(description="Why the rates are uncertain, if they are.")
    verdicts: bool = Field(True, description="False when the evidence supports no verdict yet (one good image, "
                                             "automatic or target-rate policy): predictions carry the score only and "
                                             "`is_anomalous` is null. A manual threshold always gives verdicts.")


class Validation(BaseModel):
    """What a version measures on the images operators confirmed through feedback."""

    defects: int = Field(description="Confirmed defect images (the validation set).")
    recall: float | None = Field(description="Share of them scoring above the threshold; null without any.")
    goods: int = Field(description="Confirmed good images in the memory (false alarms fed back).")
    false_alarm_rate: float | None = Field(
        description="Share of the leave-one-out scores of all good images (shots and confirmed goods, each "
                    "scored against a memory without it) above the threshold; null without confirmed goods.")


class ThresholdRequest(BaseModel):
    """Exactly one of the three fields: how the threshold is chosen from now on."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"target_false_alarm_rate": 0.02}, {"threshold": 0.31}, {"policy": "auto"}]})

    target_false_alarm_rate: float | None = Field(
        None, gt=0, lt=0.5, description="Choose the threshold that flags this share of good parts.")
    threshold: float | None = Field(None, ge=0, allow_inf_nan=False, description="Set the threshold itself.")
    policy: Literal["auto"] | None = Field(None, description="`auto`: go back to the automatic rule.")


class ThresholdChanged(BaseModel):
    """``PUT /v1/categories/{category}/threshold``: the new active version and its decision."""

    category: str = Field(description="The product category.")
    version: int = Field(description="New active version (same model, new decision rule); with `dry_run` the "
                         "version serving now, unchanged.")
    decision: Decision = Field(description="The decision rule it now serves with (with `dry_run`: would serve "
                               "with).")
    dry_run: bool = Field(False, description="True when nothing was changed (`?dry_run=true`: a preview).")
    warnings: list[str] = Field(default_factory=list, description=(
        "Set when the rule stops inspecting: expected recall 0 (no defect evidence scores above the threshold: "
        "detection is effectively off) or an expected false-alarm rate of 0.5 or more. The change is still "
        "made unless `dry_run`; preview first and ask the operator."))
    recorded: RecordedEffect | None = Field(None, description="With `dry_run`: what the candidate rule would "
                                            "flag among the recorded inspections, against the rule serving now.")


class RecordedEffect(BaseModel):
    """What a threshold does on the line's recorded traffic (``score > threshold`` over recorded scores)."""

    inspections: int = Field(description="Recorded inspections counted: the newest 1000 at most, made by `versions`.")
    versions: list[int] = Field(description="Versions whose inspections count (same model as the active one).")
    threshold_now: float | None = Field(description="The threshold serving now.")
    flagged_now: int | None = Field(description="Of them, scoring above the threshold serving now.")
    flagged: int = Field(description="Of them, scoring above the candidate threshold.")
    share_now: float | None = Field(description="flagged_now / inspections; null without inspections.")
    share: float | None = Field(description="flagged / inspections; null without inspections.")


class ScoreDistributions(BaseModel):
    """``GET /v1/categories/{category}/scores``: the scores the active decision rests on, for a histogram."""

    category: str = Field(description="The product category.")
    version: int = Field(description="The active version whose evidence this is.")
    decision: Decision = Field(description="Its decision rule; `score_normalized` = score / `threshold`.")
    normal: list[float] = Field(description="Leave-one-out scores of the registration shots and their light "
                                "views (each scored against a memory without it): how good parts score.")
    confirmed_goods: list[float] = Field(description="Leave-one-out scores of the good parts operators confirmed "
                                         "(feedback), and their light views.")
    synthetic_defects: list[float] = Field(description="Defects pasted into the shots at registration.")
    confirmed_defects: list[float] = Field(description="Defects operators confirmed (feedback).")
    good_images: int = Field(description="Good images behind `normal` and `confirmed_goods` (each with its views).")
    defect_evidence: Literal["confirmed", "synthetic"] | None = Field(
        description="Which defect scores the expected recall counts: confirmed ones when there are any.")
    recorded: list[float] = Field(description="Scores of the newest recorded inspections (newest first, at most "
                                  "`recorded`) made by `recorded_versions`.")
    recorded_versions: list[int] = Field(description="Versions that score like the active one (same tensors and "
                                         "settings; a threshold change keeps them): their inspections count.")


class FeedbackResult(BaseModel):
    """``POST /v1/categories/{category}/feedback``: what was learnt and the version that learnt it."""

    category: str = Field(description="The product category.")
    version: int = Field(description="Active version: a new one when anything was added.")
    added: int = Field(description="Images new to the category's good images or confirmed defects.")
    duplicates: int = Field(description="Images it already held with this label (or repeated in the upload).")
    decision: Decision | None = Field(description="The decision rule of the active version.")
    validation: Validation = Field(description="What that version measures on the confirmed images.")


class ShotInfo(BaseModel):
    """One good image the active version's memory was fitted on."""

    sha256: str = Field(description="SHA-256 of the stored bytes (use it to remove the shot).")
    file_name: str | None = Field(description="The name it was uploaded under.")
    added_at: datetime | None = Field(description="When it was added (UTC); null for shots from older versions.")
    source: Literal["registration", "feedback"] = Field(description="Uploaded as a shot, or a confirmed good.")
    label: Literal["good"] = Field(description="Always `good` (confirmed defects are validation, not shots).")


class ShotList(BaseModel):
    """``GET /v1/categories/{category}/shots``."""

    shots: list[ShotInfo] = Field(description="Oldest first.")


class ShotRemoved(BaseModel):
    """``DELETE /v1/categories/{category}/shots/{sha256}``: the version fitted without it."""

    category: str = Field(description="The product category.")
    version: int = Field(description="New active version, fitted without the shot.")
    shots: int = Field(description="Good images the category holds now.")
    removed: str = Field(description="SHA-256 of the removed shot.")
    decision: Decision | None = Field(description="The decision rule of the new version.")


class AdapterVersionInfo(BaseModel):
    """Key facts of one stored version, read from its manifest."""

    version: int = Field(description="Version number (1, 2, ...).")
    active: bool = Field(description="Whether predictions use this version now.")
    pinned: bool | None = Field(None, description="Kept by version retention whatever its age (PUT .../pin); "
                                "null when the pins file is unreadable.")
    integrity: str | None = Field(None, description="`ok` when the tensor file matches its manifest's sha256, else "
                                  "`corrupt: <why>` (activation is then refused with 409).")
    created: datetime | None = Field(None, description="When the version was saved (UTC).")
    promotable: bool | None = Field(None, description="Memory adapters, and fine-tunes that beat them.")
    kind: str | None = Field(None, description="`memory` (no training) or `finetuned` (LoRA + prompts).")
    branches: list[str] = Field(default_factory=list, description="Scoring branches: `text`, `memory`.")
    object_name: str | None = Field(None, description="Product description used in the prompts.")
    shots: int | None = Field(None, description="Shots the version was fitted on.")
    metrics: dict[str, Any] = Field(default_factory=dict, description="Fit/validation metrics (AUROCs etc.).")
    training_seconds: float | None = Field(None, description="Time spent fine-tuning; null for memory adapters.")
    backbone: str | None = Field(None, description="Backbone spec the version was fitted on.")
    runtime: str | None = Field(None, description="Runtime whose features the version was fitted and calibrated "
                                "on: `torch`, `onnxruntime` or `openvino` (CLIPSHOT_RUNTIME).")
    validation: Validation | None = Field(None, description="What the version measures on operator-confirmed "
                                                            "images (feedback).")
    geometry: dict[str, Any] | None = Field(None, description="The version's image geometry (see registration).")
    scoring: dict[str, Any] | None = Field(None, description="How the version turns features into scores "
                                           "(`memory_center`, `memory_stages`, `image_score`, ...).")
    scoring_selection: dict[str, Any] | None = Field(
        None, description="How the product chose that scoring from its own shots: `rule`, `chosen` and every "
                          "candidate's `image_separation` / `pixel_separation` (AUROC of its synthetic defects "
                          "against its leave-one-out normals); null when the scoring was fixed.")
    position_baseline: dict[str, Any] | None = Field(
        None, description="Whether the version divides its maps by the normal level its shots show at each position "
                          "(`chosen`: `divided` or `plain`), by which `mode` (`auto`: decided from its own shots; "
                          "`on`), with the `plain` and `divided` separations of its synthetic defects from its "
                          "leave-one-out normals, or the `reason` it could not; null when never weighed.")
    error: str | None = Field(None, description="Set when the manifest cannot be read (the version is unusable).")


class CategorySummary(BaseModel):
    """One product in ``GET /v1/categories``."""

    category: str = Field(description="The product category.")
    active_version: int | None = Field(description="Version predictions use now; null if none is usable.")
    versions: list[int] = Field(description="Every stored version, oldest first.")
    shots: int = Field(description="Distinct good shots stored for the product.")


class VersionPins(BaseModel):
    """``PUT``/``DELETE .../versions/{version}/pin``: the versions retention must keep."""

    category: str = Field(description="The product category.")
    pinned: list[int] = Field(description="Pinned versions, ascending: `CLIPSHOT_KEEP_VERSIONS` never deletes them.")


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
    decision: Decision | None = Field(None, description="How the active version decides `is_anomalous`; null "
                                                        "when no version is usable.")


class CategoryDeleted(BaseModel):
    """``DELETE /v1/categories/{category}``: the product, its versions and shots are gone."""

    category: str = Field(description="The deleted product category.")
    deleted: bool = Field(True, description="Always true (failures answer with an error instead).")
    cancelled_job_id: str | None = Field(None, description="The job that was cancelled first, if any.")


class JobList(BaseModel):
    """``GET /v1/jobs``: newest first."""

    jobs: list[Job] = Field(description="Newest first, at most `limit`.")
