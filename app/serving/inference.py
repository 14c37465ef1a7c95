"""Request-level prediction pipeline: read -> decode -> preprocess -> batcher -> post-process.

Everything CPU-bound (decoding, resizing/normalising, heatmap resize, PNG encoding) runs in the
threadpool so the event loop keeps accepting requests; the batcher hands only the stacked tensor
to the device thread. The adapter is resolved once per request and kept for all its images, so a
hot swap never splits one request across versions.
"""

from __future__ import annotations

import asyncio
import copy
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from fastapi import UploadFile
from PIL import Image
from starlette.concurrency import run_in_threadpool

from app.core.advice import image_warnings
from app.core.config import Settings
from app.core.identity import replica_name
from app.errors import BadRequestError, ClipshotHTTPError, ConflictError, ImageError, NotFoundError, OverloadedError
from app.metrics import Metrics
from app.schemas import OBJECT_NAME_PATTERN, OBJECT_NAME_RULE
from app.schemas.prediction import (
    AnomalyRegion,
    DecisionConfidence,
    Heatmap,
    HeatmapMode,
    ImagePrediction,
    PredictResponse,
    StageTimings,
)
from app.serving.adapter_cache import ZERO_SHOT_LABEL, AdapterCache
from app.serving.batcher import Batcher, BatchResult, ships_bytes
from app.serving.heatmap import b64, render
from app.serving.images import DecodedImage, decode_image, header_pixels, reduced_for_thumbnail
from app.serving.pixel_budget import PixelBudget, release_free_memory
from clipshot.adapter import Adapter
from clipshot.calibration import decision_confidence
from clipshot.detector import Detector
from clipshot.geometry import Geometry, GeometryError
from clipshot.prediction import make_prediction

HeatmapOptions = tuple[HeatmapMode, int | None]  # mode, requested longer side of the picture
OBJECT_NAME = re.compile(OBJECT_NAME_PATTERN)


@dataclass(frozen=True)
class Upload:
    filename: str | None
    data: bytes


class InferenceService:
    """Turns uploaded files into ``PredictResponse``s; routes call only this."""

    def __init__(self, settings: Settings, detector: Detector, cache: AdapterCache, batcher: Batcher,
                 metrics: Metrics) -> None:
        self.settings = settings
        self.detector = detector
        self.cache = cache
        self.batcher = batcher
        self.metrics = metrics
        # Backbone.preprocess ends with .to(device); a CPU twin keeps device transfers on the device thread.
        self._cpu_backbone = copy.copy(detector.backbone)
        self._cpu_backbone.device = torch.device("cpu")
        self._pending_images = 0  # admitted and not answered yet; only touched on the event loop
        self.pixel_budget = PixelBudget(settings.max_request_pixels, settings.max_inflight_pixels,
                                        settings.max_register_pixels)
        self._trims: set[asyncio.Future[bool]] = set()

    # -- entry points ------------------------------------------------------------------------
    async def predict_category(self, category: str, files: Sequence[UploadFile], heatmap: HeatmapMode, *,
                               heatmap_size: int | None = None, version: int | None = None) -> PredictResponse:
        """Score images with the category's active adapter (404 if there is none).

        ``version`` pins one version: the Ray Serve router resolves the active version once, at the edge,
        and routes by ``category@version``, so the replica must serve exactly that one.
        """
        self._check_count(files)
        adapter = await run_in_threadpool(self.cache.get, category, version)
        return await self._predict(adapter, category, "category", files, (heatmap, heatmap_size))

    async def predict_zero_shot(self, files: Sequence[UploadFile], heatmap: HeatmapMode,
                                object_name: str | None, *, heatmap_size: int | None = None) -> PredictResponse:
        """Score without shots: handcrafted prompts for ``object_name``, else the generic bundle."""
        self._check_count(files)
        if object_name is not None and not OBJECT_NAME.fullmatch(object_name.strip()):
            raise ClipshotHTTPError(
                f"object must be {OBJECT_NAME_RULE} (e.g. 'bottle', 'metal nut')",
                code="invalid_object", status_code=422,
            )
        adapter, source = await run_in_threadpool(self._zero_shot_adapter, object_name and object_name.strip())
        label = "generic" if source == "generic" else ZERO_SHOT_LABEL
        return await self._predict(adapter, label, source, files, (heatmap, heatmap_size))

    def _zero_shot_adapter(self, object_name: str | None) -> tuple[Adapter, str]:
        clip = self.detector.backbone.supports_text
        needs_clip = (f"zero-shot prediction needs a CLIP backbone (text prompts); this service runs "
                      f"{self.detector.backbone.spec}, which supports the few-shot memory branch only. "
                      "Register the product with good shots and use /v1/categories/{category}/predict.")
        if object_name is not None:
            if not clip:
                raise ConflictError(needs_clip, code="zero_shot_needs_clip")
            return self.cache.get_text(object_name), "handcrafted"
        try:
            return self.cache.get_generic(), "generic"
        except NotFoundError:
            if not clip:
                raise ConflictError(needs_clip, code="zero_shot_needs_clip") from None
            return self.cache.get_text(None), "handcrafted"

    @property
    def pending_images(self) -> int:
        """Images admitted and not answered yet (what ``max_pending_images`` bounds)."""
        return self._pending_images

    # -- pipeline ----------------------------------------------------------------------------
    def _check_count(self, files: Sequence[UploadFile]) -> None:
        limit = self.settings.max_predict_images
        if not files:
            raise ClipshotHTTPError("send at least one image in the `files` field", code="no_images",
                                    status_code=422)
        if len(files) > limit:
            raise ClipshotHTTPError(f"{len(files)} images sent; at most {limit} per request",
                                    code="too_many_images", status_code=413)

    async def _predict(self, adapter: Adapter, label: str, source: str, files: Sequence[UploadFile],
                       heatmap: HeatmapOptions) -> PredictResponse:
        count, limit = len(files), self.settings.max_pending_images
        if self._pending_images + count > limit:  # shed before decoding: refusing must cost nothing
            raise OverloadedError(f"{self._pending_images} images are already being scored (limit {limit}); "
                                  "retry shortly", code="overloaded")
        self._pending_images += count
        self.metrics.queue_depth.labels("admitted").inc(count)
        try:
            return await self._admitted(adapter, label, source, files, heatmap)
        finally:
            self._pending_images -= count
            self.metrics.queue_depth.labels("admitted").dec(count)

    async def _admitted(self, adapter: Adapter, label: str, source: str, files: Sequence[UploadFile],
                        heatmap: HeatmapOptions) -> PredictResponse:
        uploads = [await self._read(f) for f in files]
        pixels = sum(await run_in_threadpool(lambda: [self._header_pixels(u) for u in uploads]))
        self.pixel_budget.acquire(pixels)  # 413 / 503 from the headers, before a pixel is decoded
        try:
            return await self._decoded(adapter, label, source, uploads, heatmap)
        finally:
            if self.pixel_budget.release(pixels):  # idle after large images: hand the pages back, off-path
                trim = asyncio.get_running_loop().run_in_executor(None, release_free_memory)
                self._trims.add(trim)
                trim.add_done_callback(self._trims.discard)

    async def _decoded(self, adapter: Adapter, label: str, source: str, uploads: list[Upload],
                       heatmap: HeatmapOptions) -> PredictResponse:
        decoded = await asyncio.gather(*(run_in_threadpool(self._decode, u, label) for u in uploads))
        advice = await run_in_threadpool(self._advice, adapter, uploads, [d for d, _ in decoded])
        images = [d.image for d, _ in decoded]
        pixels, preprocess_s = await run_in_threadpool(self._preprocess, images, label, adapter.geometry)
        results = await asyncio.gather(*(self.batcher.submit(adapter, pixels[i], label) for i in range(len(images))))
        predictions = await asyncio.gather(*(
            run_in_threadpool(self._postprocess, adapter, label, upload, item, result, heatmap, decode_s, preprocess_s,
                              warnings)
            for upload, result, (item, decode_s), warnings in zip(uploads, results, decoded, advice, strict=True)
        ))
        return PredictResponse(category=predictions[0].category, adapter_version=adapter.version,
                               adapter_source=source, predictions=list(predictions), replica=replica_name())

    async def _read(self, file: UploadFile) -> Upload:
        """Read at most one byte past the per-file limit, so an oversized part is never held whole."""
        data = await file.read(self.settings.max_upload_bytes + 1)
        return Upload(file.filename, data)

    def _header_pixels(self, upload: Upload) -> int:
        try:
            return header_pixels(upload.data, max_pixels=self.settings.max_image_pixels,
                                 max_bytes=self.settings.max_upload_bytes)
        except ImageError as exc:
            raise ImageError(exc.status_code, exc.code, f"{upload.filename or 'upload'}: {exc.message}") from exc

    def _decode(self, upload: Upload, label: str) -> tuple[DecodedImage, float]:
        start = time.perf_counter()
        with self.metrics.time_stage("decode", label):
            try:
                decoded = decode_image(upload.data, max_pixels=self.settings.max_image_pixels,
                                       max_bytes=self.settings.max_upload_bytes)
            except ImageError as exc:
                name = upload.filename or "upload"
                raise ImageError(exc.status_code, exc.code, f"{name}: {exc.message}") from exc
        return decoded, time.perf_counter() - start

    def _advice(self, adapter: Adapter, uploads: list[Upload], decoded: list[DecodedImage]) -> list[list[str]]:
        """Per image, how it differs from the shots; 400 for any such image when the settings refuse them."""
        advice = [image_warnings(adapter.shot_images, d.image, d.original_mode) for d in decoded]
        if mismatched := sum(map(bool, advice)):
            self.metrics.mismatched_images.labels(adapter.category).inc(mismatched)
        if self.settings.refuse_mismatched_images:
            for upload, warnings in zip(uploads, advice, strict=True):
                if warnings:
                    raise BadRequestError(f"{upload.filename or 'upload'}: {'; '.join(warnings)} "
                                          "(CLIPSHOT_REFUSE_MISMATCHED_IMAGES is on)", code="image_mismatch")
        return advice

    def _preprocess(self, images: list[Image.Image], label: str, geometry: Geometry) -> tuple[torch.Tensor, float]:
        """(N, 3, H, W), or (N, views, 3, H, W) with tiles: one batcher item per image either way; uint8 for a
        CUDA backbone (``ships_bytes``), normalised float32 on CPU."""
        start = time.perf_counter()
        with self.metrics.time_stage("preprocess", label, images=len(images)):
            try:
                if ships_bytes(self.detector.backbone.device):
                    pixels = geometry.unit_bytes(images, self._cpu_backbone.image_size)  # normalised on the device
                else:
                    pixels = self._cpu_backbone.preprocess(images, geometry)
            except GeometryError as exc:  # e.g. an image smaller than the category's ROI
                raise BadRequestError(f"image does not fit the category's geometry: {exc}",
                                      code="invalid_geometry") from exc
            views = geometry.views_per_image
            if views > 1:
                pixels = pixels.reshape(len(images), views, *pixels.shape[1:])
        return pixels, time.perf_counter() - start

    def _postprocess(self, adapter: Adapter, label: str, upload: Upload, decoded: DecodedImage,
                     result: BatchResult, options: HeatmapOptions, decode_s: float,
                     preprocess_s: float, warnings: list[str]) -> ImagePrediction:
        start = time.perf_counter()
        image = decoded.image
        mode, size = options
        with self.metrics.time_stage("postprocess", label):
            pred = make_prediction(result.score, result.heat, adapter, image.size, None)
            # the map over the whole image (ROI, padding and tiles placed back); the plain squash is unchanged
            grid = None if mode == "none" else adapter.geometry.image_grid(result.heat, image.size,
                                                                           result.heat.shape[-1])
            # the picture's memory must not grow with the upload: at most max_overlay_side on its longer side
            out = render(image, result.heat if grid is None else grid, pred.map_threshold, mode, size,
                         max_side=self.settings.max_overlay_side)
            heatmap = None if out.encoding is None else Heatmap(
                encoding=out.encoding, data=b64(out.data), shape=list(out.shape or ()), vmin=out.vmin, vmax=out.vmax,
                dtype="float16" if out.encoding == "raw" else None)
            regions = None if out.regions is None else [
                AnomalyRegion(box=list(r.box), area_pct=r.area_pct, peak_score=r.peak_score) for r in out.regions]
        verdict = "unknown" if pred.is_anomalous is None else ("anomalous" if pred.is_anomalous else "normal")
        self.metrics.observe_verdict(label, verdict, pred.score, pred.threshold)
        ms = 1000.0
        prediction = ImagePrediction(
            filename=upload.filename, sha256=decoded.sha256, category=adapter.category,
            adapter_version=adapter.version, score=pred.score, threshold=pred.threshold,
            score_normalized=(pred.score / pred.threshold if pred.threshold and pred.is_anomalous is not None
                              else None),
            confidence=_confidence(adapter, pred.score, pred.is_anomalous),
            map_threshold=pred.map_threshold, is_anomalous=pred.is_anomalous, heatmap=heatmap, regions=regions,
            regions_total=out.regions_total, warnings=warnings,
            batch_size=result.batch_size,
            timings=StageTimings(decode_ms=decode_s * ms, preprocess_ms=preprocess_s * ms,
                                 queue_ms=result.queue_s * ms, forward_ms=result.forward_s * ms,
                                 postprocess_ms=(time.perf_counter() - start) * ms),
        )
        if self.settings.record_mode == "thumbnails":
            side = self.settings.record_thumbnail_size
            prediction.record_pictures = (reduced_for_thumbnail(image, side),
                                          None if out.picture is None else reduced_for_thumbnail(out.picture, side))
        return prediction



def _confidence(adapter: Adapter, score: float, anomalous: bool | None) -> DecisionConfidence | None:
    """The verdict's p-values from the adapter's calibration evidence; none without a verdict."""
    found = None if anomalous is None or adapter.calibration is None else decision_confidence(adapter.calibration,
                                                                                               score)
    if found is None:
        return None
    against = found.good_p_value if anomalous else found.defect_p_value
    return DecisionConfidence(p_value=against, good_p_value=found.good_p_value,
                              defect_p_value=found.defect_p_value, good_images=found.good_images,
                              defect_images=found.defect_images,
                              defect_evidence=found.defect_evidence)
