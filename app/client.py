"""Python client for a running clipshot service: ``Client(url, key).predict("bottle", ["part.png"])``.

It speaks only HTTP (httpx), so it sits above the service and imports no model code: a line PC can use
it without torch. Results are the service's own pydantic models (``app.schemas``), so client and server
share one vocabulary; images go in as paths, bytes, PIL images or numpy arrays. Every non-2xx answer
raises ``ClipshotError`` carrying the service's stable error ``code`` and the request id to look up in
the server's logs.
"""

from __future__ import annotations

import base64
import io
import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal, overload

import httpx
import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from app.jobs.job_model import TERMINAL_STATES, Job
from app.schemas import (
    CategoryDeleted,
    CategoryDetail,
    CategorySummary,
    ReadyResponse,
    ShotsRegistered,
)
from app.schemas.prediction import HeatmapMode, ImagePrediction, PredictResponse

ImageInput = str | os.PathLike[str] | bytes | Image.Image | np.ndarray
DEFAULT_URL = "http://127.0.0.1:8000"

# --- the decision routes' bodies (issue 9 §3-4 contract; tolerant of fields added later) ------------------


class Decision(BaseModel):
    """How a product decides: its threshold, the policy that set it, and what to expect from it."""

    model_config = ConfigDict(extra="allow")
    threshold: float
    policy: str | None = None
    target_false_alarm_rate: float | None = None
    expected_false_alarm_rate: float | None = None
    expected_recall: float | None = None
    confident: bool | None = None
    note: str | None = None
    verdicts: bool | None = None


class CategoryInfo(CategoryDetail):
    """``GET /v1/categories/{c}``; ``decision`` is null on servers without the decision routes."""

    model_config = ConfigDict(extra="allow")
    # the client's own Decision, looser than the server's schema, so it reads older and newer servers alike
    decision: Decision | None = None  # type: ignore[assignment]


class ThresholdChanged(BaseModel):
    model_config = ConfigDict(extra="allow")
    category: str
    version: int
    decision: Decision
    dry_run: bool = False
    warnings: list[str] = Field(default_factory=list)  # the rule stops inspecting (recall 0, half flagged)


class FeedbackResult(BaseModel):
    model_config = ConfigDict(extra="allow")
    category: str
    version: int
    added: int
    duplicates: int = 0
    decision: Decision
    validation: dict[str, Any] = Field(default_factory=dict)


class Shot(BaseModel):
    model_config = ConfigDict(extra="allow")
    sha256: str
    file_name: str | None = None
    added_at: str | None = None
    source: str | None = None
    label: str | None = None


# --- errors -------------------------------------------------------------------------------------------


class ClipshotError(Exception):
    """The service said no (``status`` >= 400) or could not be reached (``status`` 0)."""

    def __init__(self, status: int, code: str, message: str, request_id: str | None = None) -> None:
        super().__init__(f"{message} (HTTP {status}, {code})" if status else message)
        self.status, self.code, self.message, self.request_id = status, code, message, request_id


def _raise_for(response: httpx.Response) -> None:
    if response.is_success:
        return
    try:
        error = response.json()["error"]
        code, message = str(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        code, message = f"http_{response.status_code}", response.text[:200] or response.reason_phrase
    raise ClipshotError(response.status_code, code, message, response.headers.get("X-Request-ID"))


# --- images in and out --------------------------------------------------------------------------------


def encode_image(image: ImageInput, index: int = 0) -> tuple[str, bytes]:
    """(file name, bytes) for one upload; arrays and PIL images are sent as lossless PNG."""
    if isinstance(image, str | os.PathLike):
        path = Path(image)
        return path.name, path.read_bytes()
    if isinstance(image, bytes | bytearray | memoryview):
        return f"image-{index}", bytes(image)
    if isinstance(image, np.ndarray):
        array = image
        if array.dtype != np.uint8:  # floats are taken as 0..1 intensities
            array = (np.clip(array.astype(np.float64), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
        image = Image.fromarray(array)
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return f"image-{index}.png", buffer.getvalue()
    raise TypeError(f"cannot send {type(image).__name__} as an image: give a path, bytes, PIL image or numpy array")


def heatmap_image(prediction: ImagePrediction) -> Image.Image:
    """The picture of a prediction made with an image heatmap (``jpeg`` overlay, ``png`` overlay, ``mask``)."""
    heat = prediction.heatmap
    if heat is None or heat.encoding == "raw" or not heat.data:
        raise ValueError("this prediction carries no heatmap picture: predict with heatmap='jpeg' or 'png'")
    image = Image.open(io.BytesIO(base64.b64decode(heat.data)))
    image.load()
    return image


def heatmap_grid(prediction: ImagePrediction) -> np.ndarray:
    """The model-resolution score grid (float32) of a prediction made with ``heatmap='raw'``."""
    heat = prediction.heatmap
    if heat is None or heat.encoding != "raw":
        raise ValueError("this prediction carries no raw heatmap: predict with heatmap='raw'")
    return np.frombuffer(base64.b64decode(heat.data), dtype="<f2").reshape(heat.shape).astype(np.float32)


def anomaly_mask(prediction: ImagePrediction, size: tuple[int, int] | None = None) -> np.ndarray:
    """Boolean mask of the pixels that made the verdict (above the prediction's ``map_threshold``; the threshold
    itself from a server older than that field), from a raw heatmap, resized to ``size`` (w, h)."""
    if prediction.threshold is None:
        raise ValueError("the adapter is uncalibrated (no threshold), so there is no mask")
    grid = heatmap_grid(prediction)
    if size is not None:
        grid = np.asarray(Image.fromarray(grid, "F").resize(size, Image.Resampling.BILINEAR))
    level = prediction.threshold if prediction.map_threshold is None else prediction.map_threshold
    return grid > level


# --- the client ---------------------------------------------------------------------------------------


class Client:
    """One connection pool to one service; use as a context manager or call ``close()``.

    ``http`` lets a caller bring its own httpx client (e.g. an in-process ``TestClient`` over the app).
    """

    def __init__(self, url: str = DEFAULT_URL, key: str | None = None, *, timeout: float = 120.0,
                 http: httpx.Client | None = None) -> None:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.url = url.rstrip("/")
        self._http = http or httpx.Client(base_url=self.url, timeout=timeout)
        self._http.headers.update(headers)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, *, ok: tuple[int, ...] = (), **kwargs: Any) -> httpx.Response:
        """One request; statuses in ``ok`` are answers too, any other non-2xx raises ``ClipshotError``."""
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ClipshotError(0, "unreachable", f"cannot reach the service at {self.url}: {exc}") from exc
        if response.status_code not in ok:
            _raise_for(response)
        return response

    @staticmethod
    def _files(images: ImageInput | Sequence[ImageInput]) -> list[tuple[str, tuple[str, bytes]]]:
        if isinstance(images, str | bytes | bytearray | np.ndarray | Image.Image | os.PathLike) or not isinstance(
                images, Iterable):
            items = [images]
        else:  # a list, tuple or any other iterable of images
            items = list(images)
        return [("files", encode_image(item, i)) for i, item in enumerate(items)]

    # -- service ------------------------------------------------------------------------------
    def health(self) -> bool:
        """True while the process answers ``/healthz``."""
        return self._call("GET", "/healthz").json().get("status") == "ok"

    def ready(self) -> ReadyResponse:
        """``/readyz`` (503 = not ready is an answer here, not an error)."""
        return ReadyResponse.model_validate(self._call("GET", "/readyz", ok=(503,)).json())

    # -- prediction ---------------------------------------------------------------------------
    def predict(self, category: str, images: ImageInput | Sequence[ImageInput], *,
                heatmap: HeatmapMode | str | None = None, part_id: str | None = None, line: str | None = None,
                camera: str | None = None) -> PredictResponse:
        """Score images against a product's active adapter (one request; the server caps its size).

        ``part_id``, ``line`` and ``camera`` travel with the verdicts the service publishes to MQTT.
        """
        params = {"heatmap": heatmap} if heatmap else {}  # None: the service's default encoding
        data = {k: v for k, v in (("part_id", part_id), ("line", line), ("camera", camera)) if v is not None}
        r = self._call("POST", f"/v1/categories/{category}/predict", params=params, files=self._files(images),
                       data=data)
        return PredictResponse.model_validate(r.json())

    def predict_zero_shot(self, images: ImageInput | Sequence[ImageInput], *, object_name: str | None = None,
                          heatmap: HeatmapMode | str | None = None) -> PredictResponse:
        """Score without a registered product (generic bundle or CLIP prompts for ``object_name``)."""
        params = {**({"heatmap": heatmap} if heatmap else {}), **({"object": object_name} if object_name else {})}
        r = self._call("POST", "/v1/predict", params=params, files=self._files(images))
        return PredictResponse.model_validate(r.json())

    # -- products -----------------------------------------------------------------------------
    def categories(self) -> list[CategorySummary]:
        return [CategorySummary.model_validate(c) for c in self._call("GET", "/v1/categories").json()["categories"]]

    def category(self, category: str) -> CategoryInfo:
        return CategoryInfo.model_validate(self._call("GET", f"/v1/categories/{category}").json())

    @overload
    def register(self, category: str, images: ImageInput | Sequence[ImageInput], *, description: str | None = None,
                 finetune: bool = True, wait: Literal[True] = True) -> ShotsRegistered: ...
    @overload
    def register(self, category: str, images: ImageInput | Sequence[ImageInput], *, description: str | None = None,
                 finetune: bool = True, wait: Literal[False]) -> Job: ...

    def register(self, category: str, images: ImageInput | Sequence[ImageInput], *, description: str | None = None,
                 finetune: bool = True, wait: bool = True) -> ShotsRegistered | Job:
        """Register a product (or add good shots); the memory adapter serves as soon as this returns.

        ``wait=False``: return the `register` job at once (the server checked everything first); follow it with
        ``wait_job`` and read the same answer from its ``result``."""
        data = {"finetune": "true" if finetune else "false", **({"description": description} if description else {})}
        r = self._call("POST", f"/v1/categories/{category}/shots", files=self._files(images), data=data,
                       params=None if wait else {"wait": "false"})
        return ShotsRegistered.model_validate(r.json()) if wait else Job.model_validate(r.json())

    def activate(self, category: str, version: int) -> CategorySummary:
        r = self._call("POST", f"/v1/categories/{category}/versions/{version}/activate")
        return CategorySummary.model_validate(r.json())

    def delete_category(self, category: str) -> CategoryDeleted:
        return CategoryDeleted.model_validate(self._call("DELETE", f"/v1/categories/{category}").json())

    def set_threshold(self, category: str, *, target_false_alarm_rate: float | None = None,
                      threshold: float | None = None, auto: bool = False,
                      dry_run: bool = False) -> ThresholdChanged:
        """Decide by a target false-alarm rate, a fixed score, or back to the automatic rule (exactly one).

        ``dry_run``: only preview the decision and its ``warnings``; nothing changes on the server."""
        chosen = [body for body in ({"target_false_alarm_rate": target_false_alarm_rate}, {"threshold": threshold})
                  if next(iter(body.values())) is not None] + ([{"policy": "auto"}] if auto else [])
        if len(chosen) != 1:
            raise ValueError("give exactly one of target_false_alarm_rate, threshold or auto=True")
        r = self._call("PUT", f"/v1/categories/{category}/threshold", json=chosen[0],
                       params={"dry_run": "true"} if dry_run else None)
        return ThresholdChanged.model_validate(r.json())

    @overload
    def feedback(self, category: str, images: ImageInput | Sequence[ImageInput], label: Literal["good", "defect"],
                 *, defect_type: str | None = None, note: str | None = None,
                 wait: Literal[True] = True) -> FeedbackResult: ...
    @overload
    def feedback(self, category: str, images: ImageInput | Sequence[ImageInput], label: Literal["good", "defect"],
                 *, defect_type: str | None = None, note: str | None = None, wait: Literal[False]) -> Job: ...

    def feedback(self, category: str, images: ImageInput | Sequence[ImageInput], label: Literal["good", "defect"],
                 *, defect_type: str | None = None, note: str | None = None,
                 wait: bool = True) -> FeedbackResult | Job:
        """Tell the product what parts really were: ``good`` (false alarms) or ``defect``.

        ``wait=False``: return the `feedback` job at once (see ``register``)."""
        data = {"label": label, **{k: v for k, v in (("defect_type", defect_type), ("note", note)) if v}}
        r = self._call("POST", f"/v1/categories/{category}/feedback", files=self._files(images), data=data,
                       params=None if wait else {"wait": "false"})
        return FeedbackResult.model_validate(r.json()) if wait else Job.model_validate(r.json())

    def shots(self, category: str) -> list[Shot]:
        return [Shot.model_validate(s) for s in self._call("GET", f"/v1/categories/{category}/shots").json()["shots"]]

    def delete_shot(self, category: str, sha256: str) -> dict[str, Any]:
        return self._call("DELETE", f"/v1/categories/{category}/shots/{sha256}").json()

    # -- jobs ---------------------------------------------------------------------------------
    def finetune(self, category: str, *, steps: int | None = None, seconds: float | None = None,
                 seed: int | None = None) -> Job:
        body = {k: v for k, v in (("steps", steps), ("seconds", seconds), ("seed", seed)) if v is not None}
        return Job.model_validate(self._call("POST", f"/v1/categories/{category}/finetune", json=body).json())

    def job(self, job_id: str) -> Job:
        return Job.model_validate(self._call("GET", f"/v1/jobs/{job_id}").json())

    def jobs(self, *, category: str | None = None, state: str | None = None, limit: int = 100) -> list[Job]:
        params = {"limit": limit, **{k: v for k, v in (("category", category), ("state", state)) if v}}
        return [Job.model_validate(j) for j in self._call("GET", "/v1/jobs", params=params).json()["jobs"]]

    def cancel_job(self, job_id: str) -> Job:
        return Job.model_validate(self._call("DELETE", f"/v1/jobs/{job_id}").json())

    def wait_job(self, job_id: str, *, timeout: float | None = None, poll_s: float = 1.0,
                 progress: bool | Callable[[Job], None] = False) -> Job:
        """Poll until the job is final; ``progress=True`` draws a tqdm bar, a callable gets every update.

        Raises ``TimeoutError`` if it is still active after ``timeout`` seconds (the job keeps running).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        bar = None
        if progress is True:
            from tqdm import tqdm

            bar = tqdm(total=1.0, desc=f"job {job_id[:8]}", bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix}")
        try:
            while True:
                job = self.job(job_id)
                if bar is not None:
                    bar.n = job.progress
                    bar.set_postfix_str(job.state.value + (f" step {job.step}/{job.total_steps}" if job.step else ""))
                elif callable(progress):
                    progress(job)
                if job.state in TERMINAL_STATES:
                    return job
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(f"job {job_id} is still {job.state.value} after {timeout} s")
                time.sleep(poll_s)
        finally:
            if bar is not None:
                bar.close()


__all__ = ["CategoryInfo", "Client", "ClipshotError", "Decision", "FeedbackResult", "ImageInput", "Shot",
           "ThresholdChanged", "anomaly_mask", "encode_image", "heatmap_grid", "heatmap_image"]
