"""The HTTP client a line PC runs: httpx and pydantic, nothing of the model (no torch, numpy or PIL).

Overload is an answer, not a failure: the service refuses work it cannot take soon with 503 and a
``Retry-After`` header *before* doing any of it, so the same request is safe to send again after that many
seconds. ``Client`` does that ``retries`` times (never waiting longer than ``max_retry_wait_s`` at once), then
raises. Other errors raise ``ClipshotError`` at once with the service's stable error ``code`` and the request
id to look up in its logs. A connection that fails is not retried: whether the service saw the request is
unknown, and a line should know when its inspection did not happen.
"""

from __future__ import annotations

import email.utils
import io
import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import httpx

from clipshot_client.models import CategoryDetail, CategorySummary, PredictResponse, ReadyResponse

ImageInput = str | os.PathLike[str] | bytes | IO[bytes]
ImageInputs = ImageInput | list[ImageInput] | tuple[ImageInput, ...]  # a list or tuple is several images
DEFAULT_URL = "http://127.0.0.1:8000"
FALLBACK_WAIT_S = 1.0  # a 503 without a usable Retry-After: wait this long (doubling per retry)


class ClipshotError(Exception):
    """The service said no (``status`` >= 400) or could not be reached (``status`` 0)."""

    def __init__(self, status: int, code: str, message: str, request_id: str | None = None) -> None:
        super().__init__(f"{message} (HTTP {status}, {code})" if status else message)
        self.status, self.code, self.message, self.request_id = status, code, message, request_id


def retry_after_s(response: httpx.Response, attempt: int) -> float:
    """Seconds the service asked to wait (``Retry-After`` as seconds or an HTTP date), else a doubling guess."""
    value = response.headers.get("Retry-After", "").strip()
    if value.isdigit():
        return float(value)
    if value:
        try:
            when = email.utils.parsedate_to_datetime(value)
            return max(0.0, (when - datetime.now(UTC)).total_seconds())
        except (TypeError, ValueError):
            pass
    return FALLBACK_WAIT_S * 2 ** attempt


def _error(response: httpx.Response) -> ClipshotError:
    try:
        error = response.json()["error"]
        code, message = str(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        code, message = f"http_{response.status_code}", response.text[:200] or response.reason_phrase
    return ClipshotError(response.status_code, code, message, response.headers.get("X-Request-ID"))


def _upload(image: ImageInput, index: int) -> tuple[str, bytes]:
    if isinstance(image, str | os.PathLike):
        path = Path(image)
        return path.name, path.read_bytes()
    if isinstance(image, bytes | bytearray | memoryview):
        return f"image-{index}", bytes(image)
    if isinstance(image, io.IOBase) or hasattr(image, "read"):
        return Path(getattr(image, "name", f"image-{index}")).name, image.read()
    raise TypeError(f"cannot send {type(image).__name__}: give a path, bytes or a binary file object")


class Client:
    """One connection pool to one service; use as a context manager or call ``close()``."""

    def __init__(self, url: str = DEFAULT_URL, key: str | None = None, *, timeout: float = 120.0,
                 retries: int = 3, max_retry_wait_s: float = 30.0, http: httpx.Client | None = None) -> None:
        self.url = url.rstrip("/")
        self.retries, self.max_retry_wait_s = retries, max_retry_wait_s
        self._http = http or httpx.Client(base_url=self.url, timeout=timeout)
        if key:
            self._http.headers["Authorization"] = f"Bearer {key}"

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, *, ok: tuple[int, ...] = (), **kwargs: Any) -> httpx.Response:
        for attempt in range(self.retries + 1):
            try:
                response = self._http.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                raise ClipshotError(0, "unreachable", f"cannot reach the service at {self.url}: {exc}") from exc
            if response.status_code == 503 and attempt < self.retries and 503 not in ok:
                time.sleep(min(retry_after_s(response, attempt), self.max_retry_wait_s))
                continue
            if response.is_success or response.status_code in ok:
                return response
            raise _error(response)
        raise AssertionError("unreachable")  # the loop returns or raises

    def health(self) -> bool:
        """True while the process answers ``/healthz``."""
        return self._call("GET", "/healthz").json().get("status") == "ok"

    def ready(self) -> ReadyResponse:
        """``/readyz``: 503 (not ready yet) is an answer here, not something to retry."""
        return ReadyResponse.model_validate(self._call("GET", "/readyz", ok=(503,)).json())

    def predict(self, category: str, images: ImageInputs, *, heatmap: str | None = "none",
                part_id: str | None = None, line: str | None = None, camera: str | None = None) -> PredictResponse:
        """Score images against a product; ``part_id``, ``line`` and ``camera`` go with the published verdicts."""
        data = {k: v for k, v in (("part_id", part_id), ("line", line), ("camera", camera)) if v is not None}
        params = {"heatmap": heatmap} if heatmap else {}
        r = self._call("POST", f"/v1/categories/{category}/predict", params=params, data=data,
                       files=self._files(images))
        return PredictResponse.model_validate(r.json())

    def predict_zero_shot(self, images: ImageInputs, *, object_name: str | None = None,
                          heatmap: str | None = "none") -> PredictResponse:
        """Score without a registered product (generic bundle, or CLIP prompts for ``object_name``)."""
        params = {**({"heatmap": heatmap} if heatmap else {}), **({"object": object_name} if object_name else {})}
        return PredictResponse.model_validate(
            self._call("POST", "/v1/predict", params=params, files=self._files(images)).json())

    def categories(self) -> list[CategorySummary]:
        return [CategorySummary.model_validate(c) for c in self._call("GET", "/v1/categories").json()["categories"]]

    def category(self, category: str) -> CategoryDetail:
        return CategoryDetail.model_validate(self._call("GET", f"/v1/categories/{category}").json())

    @staticmethod
    def _files(images: ImageInputs) -> list[tuple[str, tuple[str, bytes]]]:
        items = list(images) if isinstance(images, list | tuple) else [images]
        return [("files", _upload(item, i)) for i, item in enumerate(items)]
