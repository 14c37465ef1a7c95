"""The inspection record and audit log as one service: opened at start-up, used by the routes, closed at exit.

The routes stay thin: they parse the query and call here. Inspections are recorded for product predictions only
(zero-shot answers belong to no product), one row per image, in the request's upload order.
"""

from __future__ import annotations

from typing import Any

from app.core.config import Settings
from app.jobs.job_db import JobDatabase
from app.metrics import Metrics
from app.records.audit import AuditLog
from app.records.inspections import InspectionStore
from app.records.pages import now_text
from app.records.record_db import open_record_database
from app.records.writer import Pending, RecordWriter
from app.schemas.prediction import PredictResponse
from app.serving.result_publisher import LineContext

KEEPS_IMAGES = ("thumbnails", "full")


class RecordService:
    """Owns the record's database connection, the inspection store, the audit log and the background writer."""

    def __init__(self, settings: Settings, metrics: Metrics, db: JobDatabase | None = None) -> None:
        self.settings = settings
        self.db = db or open_record_database(settings.store, settings.job_db)
        self.inspections = InspectionStore(self.db, settings.record_image_dir(settings.store))
        self.audit = AuditLog(self.db)
        self.writer = RecordWriter(settings, self.inspections, metrics)
        self.writer.start()  # also when recording is off: retention still applies to what was kept before

    @property
    def mode(self) -> str:
        return self.settings.record_mode

    @property
    def keeps_images(self) -> bool:
        """True when the record keeps pictures (thumbnails or full images)."""
        return self.mode in KEEPS_IMAGES

    def needs_uploads(self, answer: PredictResponse) -> bool:
        """True when the predict route must hand over the uploaded bytes: full images are kept as uploaded;
        thumbnails come from the pictures the prediction reduced (``ImagePrediction.record_pictures``), or from
        the bytes for an answer that carries none (made by another process)."""
        return self.mode == "full" or (self.mode == "thumbnails" and any(
            p.record_pictures is None for p in answer.predictions))

    def record(self, answer: PredictResponse, origin: LineContext, request_id: str | None,
               uploads: list[bytes] | None = None) -> int:
        """Queue one inspection per image of a product answer (never blocks); how many were queued."""
        if self.mode == "off" or answer.adapter_source != "category":
            return 0
        time, items = now_text(), []
        for index, pred in enumerate(answer.predictions):
            verdict = "unknown" if pred.is_anomalous is None else "anomalous" if pred.is_anomalous else "normal"
            row: dict[str, Any] = {
                "time": time, "category": pred.category, "version": pred.adapter_version, "score": pred.score,
                "score_normalized": pred.score_normalized, "verdict": verdict, "threshold": pred.threshold,
                "map_threshold": pred.map_threshold, "request_id": request_id, "part_id": origin.part_id,
                "line": origin.line, "camera": origin.camera, "filename": pred.filename, "sha256": pred.sha256,
                "replica": answer.replica,
            }
            if pred.confidence is not None:
                row.update(p_value=pred.confidence.p_value, good_p_value=pred.confidence.good_p_value,
                           defect_p_value=pred.confidence.defect_p_value,
                           defect_evidence=pred.confidence.defect_evidence)
            upload = uploads[index] if self.keeps_images and uploads and index < len(uploads) else None
            heatmap = pred.heatmap if self.keeps_images else None
            picture, overlay = (pred.record_pictures or (None, None)) if self.mode == "thumbnails" else (None, None)
            if overlay is not None:  # the overlay's thumbnail comes from the picture: no bytes to decode
                heatmap = None
            items.append(Pending(row, upload, heatmap.data if heatmap else None,
                                 heatmap.encoding if heatmap else None, picture, overlay))
        return self.writer.submit(items)

    def close(self) -> None:
        """Write what is queued, then close the database."""
        self.writer.stop()
        self.db.close()
