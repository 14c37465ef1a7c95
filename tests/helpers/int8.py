"""Shared by the int8 service tests (first written for tests/test_runtime_int8_service.py)."""

from __future__ import annotations

import io
from pathlib import Path

from fastapi.testclient import TestClient
from PIL import Image

from clipshot.backbone import Backbone
from clipshot.detector import Detector
from clipshot.runtimes import FeatureRuntime
from model_store import AdapterStore
from model_store.adapters import load_adapter
from tests.helpers.categories import image_bytes
from tests.helpers.predict import CLIENT, good, png

PROBES = [good(s) for s in (30, 31, 32)]
# Equal graphs on equal inputs: the served scores and the reference's differ by float summation order only (the
# service batches the probes one request at a time, the reference as one batch), far below any int8 effect (~1e-2).
SAME = 1e-6


def decoded(seeds, size: int = 64) -> list[Image.Image]:
    """The images ``image_bytes(seed, size=size)`` uploads, decoded at full size."""
    return [Image.open(io.BytesIO(image_bytes(s, size=size))).convert("RGB") for s in seeds]


def served_scores(client: TestClient, category: str) -> list[float]:
    """The scores the service gives ``PROBES`` for ``category``."""
    r = client.post(f"/v1/categories/{category}/predict?heatmap=none", headers=CLIENT,
                    files=[("files", (f"{i}.png", png(image), "image/png")) for i, image in enumerate(PROBES)])
    assert r.status_code == 200, r.text
    return [p["score"] for p in r.json()["predictions"]]


def reference(backbone: Backbone, store: Path, category: str, shots: list[Image.Image], cache: Path,
              version: int | None = None) -> tuple[list[float], str]:
    """Scores of the stored bundle through a fresh runtime calibrated on ``shots`` alone, and their digest."""
    runtime = FeatureRuntime("onnxruntime", cache, quantize="int8")
    detector = Detector(backbone, runtime=runtime)
    adapter, _ = load_adapter(AdapterStore(store), detector, category, version)
    digest = runtime.calibrate(backbone.preprocess(shots, adapter.geometry))
    return [p.score for p in detector.predict(PROBES, adapter, map_size=None)], digest


def max_diff(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b, strict=True))
