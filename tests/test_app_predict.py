"""POST /v1/categories/{category}/predict and /v1/predict over real HTTP (TestClient runs the lifespan)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import logging
import re
import warnings

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.api.request_id import RequestIdLogFilter, RequestIdMiddleware
from app.core.config import Settings
from app.main import create_app
from model_store import AdapterStore
from model_store.adapters import save_adapter
from tests.helpers import predict as shared
from tests.helpers.predict import ADMIN, CLIENT, KEYS, defect, files, good, png, snapshot

client, store_root = shared.client, shared.store_root  # the module-scoped fixtures, shared with other modules


def test_predict_png_heatmap_has_each_inputs_size(client):
    wide, square = good(size=(80, 48)), defect()
    r = client.post("/v1/categories/widget/predict?heatmap=png", headers=CLIENT,
                    files=files(("wide.png", png(wide)), ("defect.png", png(square))))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["category"] == "widget" and body["adapter_version"] == 1 and body["adapter_source"] == "category"
    first, second = body["predictions"]
    assert [first["filename"], second["filename"]] == ["wide.png", "defect.png"]
    for pred, image in ((first, wide), (second, square)):
        assert pred["category"] == "widget" and pred["adapter_version"] == 1
        assert pred["heatmap"]["encoding"] == "png" and pred["heatmap"]["shape"] == [image.height, image.width]
        overlay = Image.open(io.BytesIO(base64.b64decode(pred["heatmap"]["data"])))
        assert overlay.format == "PNG" and overlay.size == image.size and overlay.mode == "RGB"
        assert pred["threshold"] > 0 and set(pred["timings"]) == {
            "decode_ms", "preprocess_ms", "queue_ms", "forward_ms", "postprocess_ms"}
        assert all(v >= 0 for v in pred["timings"].values()) and pred["timings"]["forward_ms"] > 0
    assert first["is_anomalous"] is False and second["is_anomalous"] is True
    assert second["score"] > first["score"]


def test_raw_heatmap_is_float16_grid_that_gives_the_score(client):
    r = client.post("/v1/categories/widget/predict", headers=CLIENT, data={"heatmap": "raw"},
                    files=files(("a.png", png(defect()))))
    assert r.status_code == 200, r.text
    pred = r.json()["predictions"][0]
    heat = pred["heatmap"]
    assert heat["encoding"] == "raw" and heat["dtype"] == "float16" and heat["shape"] == [64, 64]
    grid = np.frombuffer(base64.b64decode(heat["data"]), dtype="<f2").reshape(heat["shape"])
    assert np.isfinite(grid).all()
    # memory-only, peak_mean image score: the score is sqrt(map peak x map mean) of this very grid (square image,
    # so the grid is the model frame), and the verdict is the peak against the map threshold.
    grid = grid.astype(np.float64)
    assert (grid.max() * grid.mean()) ** 0.5 == pytest.approx(pred["score"], rel=1e-2)
    assert pred["map_threshold"] == pytest.approx(pred["threshold"] ** 2 / grid.mean(), rel=1e-2)

    r = client.post("/v1/categories/widget/predict?heatmap=none", headers=CLIENT, files=files(("a.png", png(good()))))
    assert r.status_code == 200 and r.json()["predictions"][0]["heatmap"] is None


def test_every_answer_carries_a_request_id_and_each_verdict_its_image_hash(client):
    """Audit trail: a caller's well-formed X-Request-ID is echoed (and named in error bodies), a malformed one is
    replaced, and each prediction names the SHA-256 of the exact bytes it judged."""
    data = png(good())
    ok = client.post("/v1/categories/widget/predict?heatmap=none",
                     headers={**CLIENT, "X-Request-ID": "line7:cam2-0001"}, files=files(("a.png", data)))
    assert ok.status_code == 200 and ok.headers["x-request-id"] == "line7:cam2-0001"
    assert ok.json()["predictions"][0]["sha256"] == hashlib.sha256(data).hexdigest()
    forged = client.post("/v1/categories/widget/predict?heatmap=none",
                         headers={**CLIENT, "X-Request-ID": "bad id\tinjected"}, files=files(("a.png", data)))
    generated = forged.headers["x-request-id"]
    assert forged.status_code == 200 and re.fullmatch(r"[0-9a-f]{32}", generated)
    failed = client.post("/v1/categories/nope/predict", headers=CLIENT, files=files(("a.png", data)))
    assert failed.status_code == 404 and failed.json()["error"]["request_id"] == failed.headers["x-request-id"]
    too_big = client.post("/v1/categories/widget/predict", headers={**CLIENT, "X-Request-ID": "big-1"},
                          content=b"x" * 300_000)
    assert too_big.status_code == 413 and too_big.headers["x-request-id"] == "big-1"
    assert too_big.json()["error"]["request_id"] == "big-1"


def test_log_lines_name_their_request(caplog):
    """``clipshot serve`` prints ``[%(request_id)s]``: records made while handling a request carry its id."""
    async def endpoint(scope, receive, send):
        logging.getLogger("clipshot.test").warning("handling")
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def call():
        transport = httpx.ASGITransport(app=RequestIdMiddleware(endpoint))
        async with httpx.AsyncClient(transport=transport, base_url="http://clipshot") as c:
            return await c.get("/", headers={"X-Request-ID": "req-42"})

    caplog.handler.addFilter(RequestIdLogFilter())
    with caplog.at_level(logging.WARNING, logger="clipshot.test"):
        response = asyncio.run(call())
        logging.getLogger("clipshot.test").warning("outside")
    assert response.headers["x-request-id"] == "req-42"
    assert [(r.getMessage(), r.request_id) for r in caplog.records] == [("handling", "req-42"), ("outside", "-")]


def test_predict_needs_a_client_or_admin_key(client):
    upload = files(("a.png", png(good())))
    missing = client.post("/v1/categories/widget/predict", files=upload)
    assert missing.status_code == 401 and missing.headers["www-authenticate"].startswith("Bearer")
    wrong = client.post("/v1/categories/widget/predict", headers={"Authorization": "Bearer nope"}, files=upload)
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_key"
    assert client.post("/v1/predict", files=upload).status_code == 401
    assert client.post("/v1/categories/widget/predict", headers=CLIENT, files=upload).status_code == 200
    assert client.post("/v1/categories/widget/predict", headers=ADMIN, files=upload).status_code == 200


def _bad_requests():
    ok = png(good())
    bomb = png(Image.new("RGB", (100, 100)))  # 10k pixels > max_image_pixels, decided from the header
    noise = np.random.default_rng(0).integers(0, 255, 50_000, dtype=np.uint8).tobytes()
    return [
        ("not-an-image", "widget", files(("a.png", b"plain text, not pixels")), {}, 415, "unsupported_image"),
        ("truncated", "widget", files(("a.png", ok[: len(ok) // 2])), {}, 400, "corrupt_image"),
        ("empty-file", "widget", files(("a.png", b"")), {}, 400, "empty_file"),
        ("bomb", "widget", files(("a.png", bomb)), {}, 413, "image_too_large"),
        ("oversized-file", "widget", files(("a.png", noise)), {}, 413, "upload_too_large"),
        ("too-many", "widget", files(*[(f"{i}.png", ok) for i in range(5)]), {}, 413, "too_many_images"),
        ("unknown-category", "nope", files(("a.png", ok)), {}, 404, "category_not_found"),
        ("invalid-category", "Bad Name", files(("a.png", ok)), {}, 400, "invalid_category"),
        ("bad-heatmap", "widget", files(("a.png", ok)), {"heatmap": "gif"}, 422, "validation_error"),
        ("no-files", "widget", None, {"heatmap": "png"}, 422, "validation_error"),
        ("request-too-large", "widget", files(*[(f"{i}.bin", noise) for i in range(5)]), {}, 413,
         "request_too_large"),
    ]


@pytest.mark.parametrize(("name", "category", "upload", "data", "status", "code"), _bad_requests(),
                         ids=[case[0] for case in _bad_requests()])
def test_bad_input_is_a_clear_4xx_and_mutates_nothing(client, store_root, name, category, upload, data, status,
                                                      code):
    before = snapshot(store_root)
    r = client.post(f"/v1/categories/{category}/predict", headers=CLIENT, files=upload, data=data)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code and r.json()["error"]["message"]
    assert snapshot(store_root) == before


def test_request_size_is_rejected_from_content_length_before_reading(client):
    body = b"x" * 300_000
    r = client.post("/v1/categories/widget/predict", headers={**CLIENT, "Content-Type": "multipart/form-data; b=1"},
                    content=body)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_zero_shot_falls_back_to_handcrafted_prompts_then_uses_the_generic_bundle(client, store_root, tiny_detector):
    upload = files(("a.png", png(good())))
    named = client.post("/v1/predict", headers=CLIENT, data={"object": "bottle"}, files=upload)
    assert named.status_code == 200, named.text
    assert named.json()["adapter_source"] == "handcrafted" and named.json()["adapter_version"] is None
    assert named.json()["predictions"][0]["heatmap"]["shape"] == [64, 64]
    fallback = client.post("/v1/predict", headers=CLIENT, files=upload)
    assert fallback.status_code == 200 and fallback.json()["adapter_source"] == "handcrafted"
    assert client.post("/v1/predict?object=%3Cscript%3E", headers=CLIENT, files=upload).status_code == 422

    generic = tiny_detector.text_adapter(category="generic")
    save_adapter(AdapterStore(store_root), tiny_detector, generic, generic=True)
    r = client.post("/v1/predict", headers=CLIENT, files=upload)
    assert r.status_code == 200, r.text
    assert r.json()["adapter_source"] == "generic" and r.json()["adapter_version"] == 1
    assert r.json()["predictions"][0]["category"] == "generic"


def test_efficientnet_serves_few_shot_but_refuses_zero_shot(tmp_path):
    from clipshot.backbone import load_backbone
    from clipshot.detector import Detector

    backbone = load_backbone("imagenet:efficientnet-lite0", image_size=64)
    detector = Detector(backbone)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapter = detector.fit_memory([good(s) for s in range(4)], category="plate", calibration_views=0)
    save_adapter(AdapterStore(tmp_path), detector, adapter)
    settings = Settings(backbone="imagenet:efficientnet-lite0", image_size=64, device="cpu", store=tmp_path,
                        max_batch_wait_ms=1, **KEYS)
    with TestClient(create_app(settings, backbone=backbone)) as c:
        upload = files(("a.png", png(good())))
        r = c.post("/v1/categories/plate/predict", headers=CLIENT, files=upload)
        assert r.status_code == 200 and r.json()["predictions"][0]["heatmap"]["shape"] == [64, 64]
        for data in ({}, {"object": "bottle"}):
            z = c.post("/v1/predict", headers=CLIENT, files=upload, data=data)
            assert z.status_code == 409 and z.json()["error"]["code"] == "zero_shot_needs_clip"
            assert "CLIP" in z.json()["error"]["message"]
