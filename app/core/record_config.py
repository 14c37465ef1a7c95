"""Settings of the inspection record (every prediction kept for audit); part of the one ``Settings`` object.

Kept in their own file because they form one feature with its own retention rules; ``Settings`` inherits them,
so they come from ``CLIPSHOT_RECORD_*`` variables like every other setting and appear in the same generated
reference. The record's rows live in the job database's server (``job_db``) or, by default, in
``records.sqlite3`` in the store; its images in ``record_dir``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

RecordMode = Literal["off", "verdicts", "thumbnails", "full"]


class RecordSettings(BaseModel):
    """What the inspection record keeps of each prediction, where, and for how long (``app.records``)."""

    record_mode: RecordMode = Field(
        "off",
        description="What is kept of each product prediction: `off` (nothing), `verdicts` (time, product, version, "
        "scores, verdict, thresholds, request id, part id, line, camera), `thumbnails` (also a small JPEG of the "
        "image and of its overlay), `full` (also the uploaded file and the overlay as answered). Written by a "
        "background thread: a prediction never waits for it (see `record_queue_size`).",
    )
    record_dir: Path | None = Field(
        None,
        description="Folder for the kept images. Empty: `<store>-records` beside the adapter store (the store "
        "itself holds only products).",
    )
    record_max_age_days: float | None = Field(
        None, gt=0, le=36_500,
        description="Delete inspections (rows and images) older than this many days. Empty: no age limit.",
    )
    record_max_count: int | None = Field(
        None, ge=1,
        description="Keep at most this many inspections per product; the oldest beyond it are deleted (rows and "
        "images). Empty: no count limit.",
    )
    record_max_image_bytes: int | None = Field(
        None, ge=1,
        description="Most bytes the kept images may take in all; beyond it the oldest images are deleted and "
        "their rows kept (without images). Empty: no byte limit.",
    )
    record_retention_interval_s: float = Field(
        60.0, ge=0, le=86_400,
        description="Retention runs after a write at most this often (s), and at this period when idle; 0: "
        "after every write.",
    )
    record_queue_size: int = Field(
        10_000, ge=1, le=1_000_000,
        description="Inspections waiting for the background writer; when full a new one is dropped (counted in "
        "`clipshot_records_dropped_total`), never the prediction delayed.",
    )
    record_thumbnail_size: int = Field(
        256, ge=16, le=2048, description="Longer side of the thumbnails of `record_mode=thumbnails` (pixels).",
    )

    @field_validator("record_dir", "record_max_age_days", "record_max_count", "record_max_image_bytes",
                     mode="before")
    @classmethod
    def _empty_is_unset(cls, v: Any) -> Any:
        return None if isinstance(v, str) and not v.strip() else v

    @field_validator("record_mode", mode="before")
    @classmethod
    def _lower(cls, v: Any) -> Any:
        return v.strip().lower() if isinstance(v, str) else v

    def record_image_dir(self, store: Path) -> Path:
        """Where kept images go: ``record_dir``, or ``<store>-records`` beside ``store``."""
        if self.record_dir is not None:
            return self.record_dir.expanduser()
        store = store.expanduser().absolute()
        return store.with_name(store.name + "-records")
