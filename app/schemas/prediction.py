"""The predict answer: one verdict per uploaded image with its heatmap, regions, confidence and timings.

Kept apart from the category and job bodies (``app.schemas``) because everything downstream of a prediction
(the serving runtime that builds it, the inspection record, the MQTT/OPC UA publishers, the client) reads
these models and nothing else; grouped so the predict contract can be read in one place.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, PrivateAttr

HeatmapMode = Literal["jpeg", "png", "mask", "regions", "raw", "none"]


class Heatmap(BaseModel):
    """An anomaly map: a picture for people (jpeg/png overlay), a mask, or the numbers (raw)."""

    encoding: Literal["jpeg", "png", "mask", "raw"] = Field(
        description="`jpeg` / `png`: the input with the three strongest regions above the map threshold (`vmin`, "
        "the prediction's `map_threshold`) tinted (yellow to dark red up to `vmax`), outlined in red and numbered "
        "1-3 by peak (the first three of `regions`) in a red badge at their top-left corner; weaker regions and "
        "pixels at or below the threshold are untouched. `mask`: 1-bit PNG, white where the map exceeds it. "
        "`raw`: the score grid over the whole input at about model resolution "
        "(resize it to the input's size) as little-endian float16; outside a category's ROI it is 0."
    )
    data: str = Field(description="Base64 of the JPEG/PNG file or of the float16 bytes (row-major).")
    shape: list[int] = Field(description="[height, width] of the picture (the input's aspect, longer side at most "
                             "`heatmap_size` or 1024) or of the raw grid.")
    dtype: Literal["float16"] | None = Field(None, description="Element type of `raw` data (little-endian).")
    vmin: float | None = Field(None, description="Level the picture uses: untinted (mask: black) at or below "
                               "it. The prediction's `map_threshold`, or 0.5 when uncalibrated.")
    vmax: float | None = Field(None, description="Score at which the tint is deepest: 2 x vmin, at most 1 when "
                               "vmin is under 1 (maps divided by the product's normal level are ratios, past 1).")


class AnomalyRegion(BaseModel):
    """A connected area of the map above the prediction's `map_threshold`."""

    box: list[int] = Field(description="[x0, y0, x1, y1] in the uploaded image's pixels (x1, y1 exclusive).")
    area_pct: float = Field(description="Share of the image's area, in percent.")
    peak_score: float = Field(description="Highest anomaly score inside the region.")


class DecisionConfidence(BaseModel):
    """How sure the verdict is, read off the product's own evidence (conformal p-values)."""

    p_value: float | None = Field(description="The value that speaks against this verdict: `good_p_value` for an "
                                  "anomalous part, `defect_p_value` for a normal one. Small = a sure verdict.")
    good_p_value: float = Field(description="Share of the product's good images (each scored against a memory "
                                "without it) that score at least this high, as (k + 1) / (n + 1): \"a good part "
                                "scores this high in X % of cases\". For a flagged part, the chance it is a good "
                                "part after all.")
    defect_p_value: float | None = Field(description="Share of the defect evidence scoring at most this high, as "
                                         "(k + 1) / (n + 1): \"a defect scores this low in X % of cases\". Null "
                                         "without defect evidence.")
    good_images: int = Field(description="Good images the good p-value rests on (shots and confirmed goods).")
    defect_images: int = Field(description="Defect scores the defect p-value rests on.")
    defect_evidence: Literal["confirmed", "synthetic"] | None = Field(
        description="`confirmed`: defects an operator confirmed through feedback; `synthetic`: defects pasted "
        "into the shots at registration (cruder than real ones, so this reading is optimistic); null: none.")


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
    score_normalized: float | None = Field(
        None, description="score / threshold: 1.0 is this product's threshold, above 1 anomalous, so scores of "
        "different products (whose raw ranges differ) read alike. Null when there is no threshold (or it is 0).")
    confidence: DecisionConfidence | None = Field(
        None, description="How sure the verdict is, against the product's stored evidence: conformal p-values, "
        "no model of the scores. Each is (k + 1) / (n + 1) over n stored scores, so it never goes below 1 / (n + 1): "
        "with 4 shots no part looks rarer than 20 % among good ones, however high it scores; that is all 4 photos "
        "can say, and confirming good parts and defects (feedback) sharpens it. It assumes parts vary as the "
        "evidence did (shots from one batch or position understate that). Null when there is no verdict.")
    threshold: float | None = Field(description="Calibrated decision threshold; null when uncalibrated.")
    map_threshold: float | None = Field(
        None, description="Heatmap level that made this verdict: the image is anomalous exactly when its map's "
        "maximum exceeds it, and the overlay tint, `mask` and `regions` start there. Equal to `threshold` for "
        "the `peak` image score; for `peak_mean` (the default since issue 10) it is threshold² / the map's mean, so "
        "it differs per image. Null when uncalibrated.")
    is_anomalous: bool | None = Field(description="score > threshold; null when there is no threshold.")
    heatmap: Heatmap | None = Field(None, description="Anomaly map in the requested encoding; null for `none` and "
                                    "`regions`.")
    regions: list[AnomalyRegion] | None = Field(
        None, description="For `heatmap=regions` and `mask`: areas above the threshold, strongest (highest peak) "
        "first (at most 32); the overlay numbers the first three 1-3. Empty when none. Null for the other modes.")
    regions_total: int | None = Field(None, description="How many regions there were (the list keeps 32).")
    warnings: list[str] = Field(default_factory=list, description=(
        "Why this verdict may be unreliable: an image far smaller than the product's shots (enlarged more than "
        "2x beyond them), greyscale against colour shots (or the reverse), or another aspect ratio (more than "
        "1.2x apart). `CLIPSHOT_REFUSE_MISMATCHED_IMAGES=true` answers 400 `image_mismatch` instead."))
    batch_size: int = Field(description="Images in the device batch this image ran in.")
    timings: StageTimings = Field(description="Where this image's time went in the server.")
    # Not part of the answer: the upload and its overlay reduced for the inspection record's thumbnails (record
    # mode `thumbnails`), made while both pictures are at hand so the record's writer decodes neither again.
    _record_pictures: Any = PrivateAttr(None)

    @property
    def record_pictures(self) -> Any:
        """``(upload, overlay or None)`` as reduced PIL images for the record's thumbnails, or None."""
        return self._record_pictures

    @record_pictures.setter
    def record_pictures(self, pictures: Any) -> None:
        self._record_pictures = pictures


class PredictResponse(BaseModel):
    """Predictions in upload order."""

    category: str = Field(description="Product category (or `generic` / `zero-shot` for /v1/predict).")
    adapter_version: int | None = Field(description="Adapter version used for every image of the request.")
    adapter_source: Literal["category", "generic", "handcrafted"] = Field(
        description="`category`: the product's active bundle; `generic`: the stored zero-shot bundle; "
        "`handcrafted`: CLIP prompts built on the fly (no bundle stored)."
    )
    predictions: list[ImagePrediction] = Field(description="One per uploaded file, in upload order.")
    replica: str = Field(description="The process that scored the request: `host:pid`, or under Ray Serve the "
                         "replica id followed by `@host:pid` (also sent as the `X-Clipshot-Replica` header).")
