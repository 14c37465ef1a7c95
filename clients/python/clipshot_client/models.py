"""Response models of the clipshot HTTP API, generated from the service's OpenAPI schema; do not edit.

Regenerate with ``python -m app.api.client_models > clients/python/clipshot_client/models.py`` (in the clipshot
repository); a test there fails when this file and the service's schema disagree.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())


class AdapterVersionInfo(_Model):
    """Key facts of one stored version, read from its manifest."""

    version: int
    active: bool
    pinned: bool | None = None
    integrity: str | None = None
    created: datetime | None = None
    promotable: bool | None = None
    kind: str | None = None
    branches: list[str] | None = None
    object_name: str | None = None
    shots: int | None = None
    metrics: dict[str, Any] | None = None
    training_seconds: float | None = None
    backbone: str | None = None
    runtime: str | None = None
    validation: Validation | None = None
    geometry: dict[str, Any] | None = None
    scoring: dict[str, Any] | None = None
    scoring_selection: dict[str, Any] | None = None
    position_baseline: dict[str, Any] | None = None
    error: str | None = None


class AnomalyRegion(_Model):
    """A connected area of the map above the prediction's `map_threshold`."""

    box: list[int]
    area_pct: float
    peak_score: float


class AuditEvent(_Model):
    """One admin change."""

    id: int
    time: str
    key_name: str
    scope: str
    action: str
    category: str | None
    before_version: int | None
    after_version: int | None
    detail: dict[str, Any] | None
    request_id: str | None


class AuditPage(_Model):
    """Audit events newest first."""

    events: list[AuditEvent]
    next_cursor: str | None


class CategoryDeleted(_Model):
    """``DELETE /v1/categories/{category}``: the product, its versions and shots are gone."""

    category: str
    deleted: bool = True
    cancelled_job_id: str | None = None


class CategoryDetail(_Model):
    """``GET /v1/categories/{category}``: every version with its facts, plus the active job if any."""

    category: str
    active_version: int | None
    shots: int
    versions: list[AdapterVersionInfo]
    active_job: Job | None = None
    decision: Decision | None = None


class CategoryList(_Model):
    """``GET /v1/categories``: every registered product."""

    categories: list[CategorySummary]


class CategorySummary(_Model):
    """One product in ``GET /v1/categories``."""

    category: str
    active_version: int | None
    versions: list[int]
    shots: int


class Decision(_Model):
    """The active decision rule (``score > threshold`` = anomalous) and what it is expected to do."""

    threshold: float
    policy: Literal['auto', 'target_rate', 'manual']
    target_false_alarm_rate: float | None
    expected_false_alarm_rate: float | None
    expected_recall: float | None
    confident: bool
    note: str | None
    verdicts: bool = True


class DecisionConfidence(_Model):
    """How sure the verdict is, read off the product's own evidence (conformal p-values)."""

    p_value: float | None
    good_p_value: float
    defect_p_value: float | None
    good_images: int
    defect_images: int
    defect_evidence: Literal['confirmed', 'synthetic'] | None


class ErrorBody(_Model):
    """ErrorBody"""

    error: ErrorDetail


class ErrorDetail(_Model):
    """ErrorDetail"""

    code: str
    message: str
    request_id: str | None = None


class FeedbackResult(_Model):
    """``POST /v1/categories/{category}/feedback``: what was learnt and the version that learnt it."""

    category: str
    version: int
    added: int
    duplicates: int
    decision: Decision | None
    validation: Validation


class FinetuneRequest(_Model):
    """Optional budget of ``POST /v1/categories/{category}/finetune``; omitted fields use the settings."""

    steps: int | None = None
    seconds: float | None = None
    seed: int | None = None


class HealthResponse(_Model):
    """Liveness: the process serves HTTP."""

    status: Literal['ok'] = 'ok'


class Heatmap(_Model):
    """An anomaly map: a picture for people (jpeg/png overlay), a mask, or the numbers (raw)."""

    encoding: Literal['jpeg', 'png', 'mask', 'raw']
    data: str
    shape: list[int]
    dtype: Literal['float16'] | None = None
    vmin: float | None = None
    vmax: float | None = None


class ImagePrediction(_Model):
    """The verdict for one uploaded image."""

    filename: str | None
    sha256: str
    category: str
    adapter_version: int | None
    score: float
    score_normalized: float | None = None
    confidence: DecisionConfidence | None = None
    threshold: float | None
    map_threshold: float | None = None
    is_anomalous: bool | None
    heatmap: Heatmap | None = None
    regions: list[AnomalyRegion] | None = None
    regions_total: int | None = None
    warnings: list[str] | None = None
    batch_size: int
    timings: StageTimings


class Inspection(_Model):
    """One recorded prediction of one image."""

    id: int
    time: str
    category: str
    version: int | None
    score: float
    score_normalized: float | None
    verdict: Literal['normal', 'anomalous', 'unknown']
    threshold: float | None
    map_threshold: float | None
    request_id: str | None
    part_id: str | None
    line: str | None
    camera: str | None
    filename: str | None
    sha256: str
    image_path: str | None
    overlay_path: str | None
    image_bytes: int
    replica: str | None
    p_value: float | None = None
    good_p_value: float | None = None
    defect_p_value: float | None = None
    defect_evidence: Literal['confirmed', 'synthetic'] | None = None


class InspectionPage(_Model):
    """Inspections newest first."""

    inspections: list[Inspection]
    next_cursor: str | None


class InspectionTrend(_Model):
    """``GET .../inspections/trend``: verdict rate and normalised-score drift per bucket, oldest first."""

    category: str
    bucket: Literal['hour', 'day']
    since: str
    until: str
    buckets: list[TrendBucket]
    reference: TrendReference | None


class InspectionsDeleted(_Model):
    """``DELETE .../inspections``: how many inspections (and their images) were removed."""

    category: str
    before: str
    deleted: int


class Job(_Model):
    """One background job; also the API response schema for job endpoints."""

    id: str
    category: str
    kind: Literal['finetune', 'register', 'feedback', 'remove_shot']
    state: JobState
    progress: float = 0.0
    stage: str | None = None
    step: int | None = None
    total_steps: int | None = None
    message: str | None = None
    params: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None
    error: str | None = None
    result_version: int | None = None
    result: dict[str, Any] | None = None
    worker: str | None = None
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None


class JobList(_Model):
    """``GET /v1/jobs``: newest first."""

    jobs: list[Job]


class JobState(StrEnum):
    """JobState"""

    QUEUED = 'queued'
    RUNNING = 'running'
    SUCCEEDED = 'succeeded'
    FAILED = 'failed'
    CANCELLED = 'cancelled'


class PredictResponse(_Model):
    """Predictions in upload order."""

    category: str
    adapter_version: int | None
    adapter_source: Literal['category', 'generic', 'handcrafted']
    predictions: list[ImagePrediction]
    replica: str


class ReadyResponse(_Model):
    """Readiness: the backbone is loaded and a real forward pass just succeeded on the device."""

    status: Literal['ready', 'not_ready']
    backbone: str
    device: str
    finetune: bool = False
    checked_seconds_ago: float
    detail: str | None = None


class RecordedEffect(_Model):
    """What a threshold does on the line's recorded traffic (``score > threshold`` over recorded scores)."""

    inspections: int
    versions: list[int]
    threshold_now: float | None
    flagged_now: int | None
    flagged: int
    share_now: float | None
    share: float | None


class ScoreDistributions(_Model):
    """``GET /v1/categories/{category}/scores``: the scores the active decision rests on, for a histogram."""

    category: str
    version: int
    decision: Decision
    normal: list[float]
    confirmed_goods: list[float]
    synthetic_defects: list[float]
    confirmed_defects: list[float]
    good_images: int
    defect_evidence: Literal['confirmed', 'synthetic'] | None
    recorded: list[float]
    recorded_versions: list[int]


class ShotInfo(_Model):
    """One good image the active version's memory was fitted on."""

    sha256: str
    file_name: str | None
    added_at: datetime | None
    source: Literal['registration', 'feedback']
    label: Literal['good']


class ShotList(_Model):
    """``GET /v1/categories/{category}/shots``."""

    shots: list[ShotInfo]


class ShotRemoved(_Model):
    """``DELETE /v1/categories/{category}/shots/{sha256}``: the version fitted without it."""

    category: str
    version: int
    shots: int
    removed: str
    decision: Decision | None


class ShotsRegistered(_Model):
    """Answer to ``POST /v1/categories/{category}/shots``: the version serving now and the fine-tune job."""

    category: str
    version: int
    job_id: str | None
    shots: int
    added: int
    warnings: list[str] | None = None
    decision: Decision | None = None
    geometry: dict[str, Any] | None = None


class StageTimings(_Model):
    """Where this image's time went (milliseconds); forward is shared by everything in its batch."""

    decode_ms: float
    preprocess_ms: float
    queue_ms: float
    forward_ms: float
    postprocess_ms: float


class ThresholdChanged(_Model):
    """``PUT /v1/categories/{category}/threshold``: the new active version and its decision."""

    category: str
    version: int
    decision: Decision
    dry_run: bool = False
    warnings: list[str] | None = None
    recorded: RecordedEffect | None = None


class ThresholdRequest(_Model):
    """Exactly one of the three fields: how the threshold is chosen from now on."""

    target_false_alarm_rate: float | None = None
    threshold: float | None = None
    policy: Literal['auto'] | None = None


class TrendBucket(_Model):
    """One hour or day of a product's recorded inspections."""

    start: str
    inspections: int
    anomalous: int
    normal: int
    anomalous_rate: float | None
    scored: int
    score_mean: float | None
    score_p95: float | None
    score_max: float | None


class TrendReference(_Model):
    """What the active version's good evidence scores, normalised the same way: the line drift is read against."""

    version: int
    threshold: float
    normal_scores: int
    score_mean: float | None
    score_p95: float | None
    score_max: float | None
    expected_false_alarm_rate: float | None


class Validation(_Model):
    """What a version measures on the images operators confirmed through feedback."""

    defects: int
    recall: float | None
    goods: int
    false_alarm_rate: float | None


class VersionPins(_Model):
    """``PUT``/``DELETE .../versions/{version}/pin``: the versions retention must keep."""

    category: str
    pinned: list[int]
