"""Issue 13 item 1: decoded pixels are bounded per request and across requests in flight, overlays are bounded.

The in-process tests pin the rules; ``test_peak_rss_stays_bounded_and_returns_after_a_spike`` measures a real
``clipshot serve`` process's resident memory (/proc) under the audit's attack: PNGs of zeros that are tiny on
the wire and 120 MB each once decoded.
"""

from __future__ import annotations

import base64
import io
import shutil
import sys
import threading
import time
import warnings
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from live_server import ADMIN, CLIENT, live_server
from PIL import Image
from pydantic import ValidationError

from app.core.config import Settings
from app.errors import ClipshotHTTPError, OverloadedError
from app.main import create_app
from app.serving.pixel_budget import PixelBudget
from model_store import AdapterStore
from model_store.adapters import save_adapter
from tests.helpers.budget import _rss, zero_png
from tests.helpers.predict import good, png, snapshot

AUTH = {"Authorization": f"Bearer {CLIENT}"}
MiB = 1 << 20


@pytest.fixture(scope="module")
def store_root(tmp_path_factory, tiny_detector):
    root = tmp_path_factory.mktemp("pixel-store")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapter = tiny_detector.fit_memory([good(s) for s in range(4)], category="widget", text=False,
                                           calibration_views=0)
    save_adapter(AdapterStore(root), tiny_detector, adapter)
    return root


def test_pixel_budget_refuses_per_request_with_413_and_in_flight_with_503():
    budget = PixelBudget(max_request_pixels=100, max_inflight_pixels=150)
    with pytest.raises(ClipshotHTTPError) as too_big:
        budget.acquire(101)
    assert too_big.value.status_code == 413 and budget.inflight == 0
    budget.acquire(100)
    with pytest.raises(OverloadedError) as busy:
        budget.acquire(51)
    assert busy.value.status_code == 503 and busy.value.headers["Retry-After"] == "1" and budget.inflight == 100
    budget.acquire(50)
    budget.release(100)
    budget.release(50)
    assert budget.inflight == 0


def test_pixel_limits_must_grow_from_image_to_request_to_in_flight():
    with pytest.raises(ValidationError, match="pixel limits must grow"):
        Settings(_env_file=None, max_image_pixels=1000, max_request_pixels=999)
    with pytest.raises(ValidationError, match="pixel limits must grow"):
        Settings(_env_file=None, max_request_pixels=1000, max_inflight_pixels=999, max_image_pixels=10)
    # registration's bound: between one image and the in-flight budget; by default 12 MP a shot, capped
    with pytest.raises(ValidationError, match="max_register_pixels"):
        Settings(_env_file=None, max_image_pixels=1000, max_register_pixels=999)
    with pytest.raises(ValidationError, match="max_register_pixels"):
        Settings(_env_file=None, max_register_pixels=300_000_000)  # over the 200 MP in-flight default
    assert Settings(_env_file=None, max_shots=4).max_register_pixels == 48_000_000
    assert Settings(_env_file=None).max_register_pixels == 192_000_000  # 16 shots: under 200 MP in flight
    assert Settings(_env_file=None, max_shots=32).max_register_pixels == 200_000_000  # capped at in flight


def test_request_pixels_are_refused_from_headers_and_overlays_are_bounded(store_root):
    settings = Settings(backbone="test:tiny-clip", device="cpu", store=store_root, client_keys=[CLIENT],
                        max_image_pixels=20_000, max_request_pixels=30_000, max_inflight_pixels=40_000,
                        max_overlay_side=64)
    wide = png(good(size=(160, 120)))  # 19,200 pixels: one fits the request budget, two do not
    with TestClient(create_app(settings)) as client:
        before = snapshot(store_root)
        r = client.post("/v1/categories/widget/predict", headers=AUTH,
                        files=[("files", (f"{i}.png", wide, "image/png")) for i in range(2)])
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_many_pixels", r.text[:300]
        assert snapshot(store_root) == before
        assert client.app.state.inference.pixel_budget.inflight == 0
        budget = client.app.state.inference.pixel_budget
        budget.acquire(30_000)  # as if another request were in flight: 10,000 pixels left, `wide` needs 19,200
        r = client.post("/v1/categories/widget/predict", headers=AUTH, files=[("files", ("a.png", wide, "image/png"))])
        assert r.status_code == 503 and r.headers["Retry-After"] == "1", r.text[:300]
        assert r.json()["error"]["code"] == "overloaded_pixels"
        budget.release(30_000)
        r = client.post("/v1/categories/widget/predict", headers=AUTH, files=[("files", ("a.png", wide, "image/png"))])
        assert r.status_code == 200, r.text[:300]
        heat = r.json()["predictions"][0]["heatmap"]
        overlay = Image.open(io.BytesIO(base64.b64decode(heat["data"])))
        assert heat["shape"] == [48, 64] and overlay.size == (64, 48)  # 160x120 contained in 64x64


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.slow
def test_peak_rss_stays_bounded_and_returns_after_a_spike(tmp_path, store_root):
    shutil.copytree(store_root, tmp_path / "store")
    side = 6324  # 39.99 MP: just under the default max_image_pixels, 120 MB as RGB, ~120 KB as PNG
    bomb = zero_png(side, side)
    env = {"CLIPSHOT_MAX_REQUEST_PIXELS": "40000000", "CLIPSHOT_MAX_INFLIGHT_PIXELS": "80000000",
           "CLIPSHOT_MAX_BATCH_WAIT_MS": "2"}
    with live_server(tmp_path, **env) as server:
        pid = server.proc.pid
        url = f"{server.base}/v1/categories/widget/predict"
        small = [("files", ("ok.png", png(good()), "image/png"))]
        headers = {"Authorization": f"Bearer {ADMIN}"}
        for _ in range(3):  # warm up every code path before taking the baseline
            assert httpx.post(url, files=small, headers=headers, timeout=60).status_code == 200
        time.sleep(1)
        baseline = _rss(pid, "VmRSS")
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
        statuses: list[int] = []

        def client(files: int) -> None:
            upload = [("files", (f"{i}.png", bomb, "image/png")) for i in range(files)]
            for _ in range(60):  # a well-behaved client: honour 503 + Retry-After
                r = httpx.post(url, files=upload, headers=headers, timeout=120)
                statuses.append(r.status_code)
                if r.status_code != 503:
                    return
                time.sleep(float(r.headers["Retry-After"]))

        threads = [threading.Thread(target=client, args=(n,)) for n in (4, 1, 1, 1, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        peak = _rss(pid, "VmHWM")
        time.sleep(2)  # the trim runs once the last large request is answered
        after = _rss(pid, "VmRSS")
    print(f"baseline {baseline / MiB:.0f} MiB, peak {peak / MiB:.0f} MiB, after {after / MiB:.0f} MiB, {statuses}")
    # Bar: 80 MP in flight x 3 bytes (RGB) = 240 MB, doubled while a decode converts to RGB = 480 MB, plus
    # bounded overlays and allocator slack. Before the fix the same burst decoded all 8 images (~1 GB) and
    # drew full-size overlays (~0.7 GB more each).
    assert peak - baseline < 700 * MiB, f"peak grew by {(peak - baseline) / MiB:.0f} MiB"
    # Bar: idle memory returns to within 100 MiB of the baseline (the audit saw +2.8 GB that stayed).
    assert after - baseline < 100 * MiB, f"idle RSS stayed {(after - baseline) / MiB:.0f} MiB above baseline"
    assert 413 in statuses and statuses.count(200) == 4, statuses  # the 4-image request never fits
