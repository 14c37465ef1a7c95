"""Response bodies of the record routes (inspections and audit log), as the API documents them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

_CURSOR_DOC = "Pass as `cursor` to get the next (older) page; null on the last page."


class Inspection(BaseModel):
    """One recorded prediction of one image."""

    id: int = Field(description="Row id (increases with insertion; with `time` it orders the record).")
    time: str = Field(description="When the answer was made (UTC, ISO 8601 with microseconds).")
    category: str = Field(description="Product.")
    version: int | None = Field(description="Adapter version that scored the image.")
    score: float = Field(description="Image anomaly score.")
    score_normalized: float | None = Field(description="score / threshold (1.0 = the product's threshold).")
    verdict: Literal["normal", "anomalous", "unknown"] = Field(description="`unknown`: no threshold yet.")
    threshold: float | None = Field(description="Decision threshold in force.")
    map_threshold: float | None = Field(description="Heatmap level of the verdict (see the predict answer).")
    request_id: str | None = Field(description="The predict request's id (`X-Request-ID`), for its logs.")
    part_id: str | None = Field(description="Part id the client sent (form field `part_id` or header).")
    line: str | None = Field(description="Line the client sent (form field `line` or header).")
    camera: str | None = Field(description="Camera the client sent (form field `camera` or header).")
    filename: str | None = Field(description="Uploaded file name.")
    sha256: str = Field(description="SHA-256 of the uploaded bytes.")
    image_path: str | None = Field(description="Kept image (thumbnail or upload), relative to the record folder.")
    overlay_path: str | None = Field(description="Kept overlay, relative to the record folder.")
    image_bytes: int = Field(description="Bytes of the kept image and overlay.")
    replica: str | None = Field(description="The process that answered.")
    p_value: float | None = Field(None, description="The verdict's confidence as the answer gave it: the p-value "
                                  "that speaks against the verdict (small = sure); null without a verdict and for "
                                  "inspections recorded before confidences were kept.")
    good_p_value: float | None = Field(None, description="Share of the product's good evidence scoring at least "
                                       "this high (see the predict answer's `confidence`).")
    defect_p_value: float | None = Field(None, description="Share of the defect evidence scoring at most this high; "
                                         "null without defect evidence.")
    defect_evidence: Literal["confirmed", "synthetic"] | None = Field(
        None, description="What the defect p-value rests on: confirmed defects or synthetic ones.")


class InspectionPage(BaseModel):
    """Inspections newest first."""

    inspections: list[Inspection]
    next_cursor: str | None = Field(description=_CURSOR_DOC)


class InspectionsDeleted(BaseModel):
    """``DELETE .../inspections``: how many inspections (and their images) were removed."""

    category: str
    before: str = Field(description="Inspections older than this (UTC) were deleted.")
    deleted: int


class AuditEvent(BaseModel):
    """One admin change."""

    id: int
    time: str = Field(description="When the change was made (UTC, ISO 8601).")
    key_name: str = Field(description="Name of the key that made it (never the key).")
    scope: str = Field(description="`admin` (only admin keys change things).")
    action: str = Field(description="register, shots_add, shot_remove, threshold, feedback, activate, rollback, "
                        "pin, unpin, delete, finetune_start, finetune_cancel, inspections_delete.")
    category: str | None = Field(description="Product changed (null for job cancels).")
    before_version: int | None = Field(description="Active version before the change.")
    after_version: int | None = Field(description="Active version after it.")
    detail: dict[str, Any] | None = Field(description="What else identifies the change (version, shot, job id).")
    request_id: str | None = Field(description="The request's id, for its logs.")


class AuditPage(BaseModel):
    """Audit events newest first."""

    events: list[AuditEvent]
    next_cursor: str | None = Field(description=_CURSOR_DOC)


class TrendBucket(BaseModel):
    """One hour or day of a product's recorded inspections."""

    start: str = Field(description="Start of the bucket (UTC, ISO 8601); it lasts one `bucket`.")
    inspections: int = Field(description="Inspections recorded in the bucket.")
    anomalous: int = Field(description="Of those, answered anomalous.")
    normal: int = Field(description="Of those, answered normal (the rest had no threshold: `unknown`).")
    anomalous_rate: float | None = Field(description="anomalous / (anomalous + normal); null without verdicts.")
    scored: int = Field(description="Inspections with a normalised score (those with a verdict).")
    score_mean: float | None = Field(description="Mean normalised score (score / threshold; 1.0 = threshold).")
    score_p95: float | None = Field(description="95th percentile of the normalised score, nearest rank: the "
                                    "smallest recorded value with at least 95 % of the bucket at or below it.")
    score_max: float | None = Field(description="Largest normalised score.")


class TrendReference(BaseModel):
    """What the active version's good evidence scores, normalised the same way: the line drift is read against."""

    version: int = Field(description="The active version whose calibration this is.")
    threshold: float = Field(description="Its threshold (the raw score that normalises to 1.0).")
    normal_scores: int = Field(description="Leave-one-out scores of its good images and their light views.")
    score_mean: float | None = Field(description="Their mean, normalised.")
    score_p95: float | None = Field(description="Their 95th percentile (nearest rank), normalised.")
    score_max: float | None = Field(description="The largest, normalised.")
    expected_false_alarm_rate: float | None = Field(description="The false-alarm rate the version expects on "
                                                    "good parts: compare with the buckets' `anomalous_rate`.")


class InspectionTrend(BaseModel):
    """``GET .../inspections/trend``: verdict rate and normalised-score drift per bucket, oldest first."""

    category: str
    bucket: Literal["hour", "day"] = Field(description="Bucket length (UTC hours or UTC days).")
    since: str = Field(description="Start of the first bucket (UTC).")
    until: str = Field(description="End of the last bucket (UTC, exclusive).")
    buckets: list[TrendBucket] = Field(description="Every bucket of the range, empty ones included.")
    reference: TrendReference | None = Field(description="The active version's calibration, normalised; null when "
                                             "the product has no usable version or no threshold.")
