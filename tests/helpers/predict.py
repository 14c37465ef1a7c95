"""Shared by the test modules (first written for tests/test_app_predict.py)."""

from __future__ import annotations

import io
import warnings

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.core.config import Settings
from app.main import create_app
from model_store import AdapterStore
from model_store.adapters import save_adapter
from tests.conftest import textured

CLIENT = {"Authorization": "Bearer client-key"}
ADMIN = {"Authorization": "Bearer admin-key"}
KEYS = {"client_keys": ["client-key"], "admin_keys": ["admin-key"]}
LIMITS = {"max_predict_images": 4, "max_upload_bytes": 40_000, "max_request_bytes": 200_000,
          "max_image_pixels": 8_000}


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def good(seed: int = 11, size: tuple[int, int] | None = None) -> Image.Image:
    image = Image.fromarray(textured(seed))
    return image.resize(size) if size else image


def defect(seed: int = 12) -> Image.Image:
    pixels = textured(seed)
    pixels[20:40, 20:40] = 0
    return Image.fromarray(pixels)


def files(*items: tuple[str, bytes]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (name, data, "image/png")) for name, data in items]


def snapshot(root) -> dict[str, float]:
    """Every file under the store with its mtime: a rejected request must leave this unchanged."""
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file() and not p.name.startswith("jobs.")}


@pytest.fixture(scope="module")
def store_root(tmp_path_factory, tiny_detector):
    root = tmp_path_factory.mktemp("predict-store")
    shots = [good(seed) for seed in range(4)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapter = tiny_detector.fit_memory(shots, category="widget", text=False, calibration_views=0)
    save_adapter(AdapterStore(root), tiny_detector, adapter)
    return root


@pytest.fixture(scope="module")
def client(store_root):
    settings = Settings(backbone="test:tiny-clip", device="cpu", store=store_root, max_batch_wait_ms=2,
                        **KEYS, **LIMITS)
    with TestClient(create_app(settings)) as test_client:
        yield test_client
