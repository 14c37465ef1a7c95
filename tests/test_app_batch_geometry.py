"""Products whose geometries shape their pixels differently (square squash, native non-square frame, tiles) sent
at once to a real server on loopback: every request answers, and each answer equals the same image served alone."""

from __future__ import annotations

import asyncio
import base64
import io

import httpx
import numpy as np
from PIL import Image
from threaded_server import threaded_server

from app.core.config import Settings

ADMIN = {"Authorization": "Bearer admin-key"}
CLIENT = {"Authorization": "Bearer client-key"}

# product -> (upload width, height, registration geometry fields); two products per geometry, so a batch can hold
# two products of the same frame (one forward) next to products of other frames (other forwards)
PRODUCTS = {
    "square-a": (80, 80, {"resize": "squash"}),
    "square-b": (80, 80, {"resize": "squash"}),
    "native-a": (150, 60, {"resize": "native"}),
    "native-b": (150, 60, {"resize": "native"}),
    "tiled-a": (150, 60, {"resize": "squash", "tile": "50"}),
    "tiled-b": (150, 60, {"resize": "squash", "tile": "50"}),
}
PER_PRODUCT = 2  # requests per product in the burst
# A tiny-clip burst of 12 images answers in seconds even on a loaded 2-core box; the bound only turns a hang into
# a failure instead of a stuck suite.
CLIENT_TIMEOUT_S = 60.0
SCORE_TOLERANCE = 1e-4  # fp32 batched vs lone forward differ by ~1e-6 (tests/test_core_mixed_batch.py)
# raw heatmaps travel as float16: 1e-3 is two float16 steps near 1.0, the top of the maps' range
MAP_TOLERANCE = 1e-3


def part_png(seed: int, width: int, height: int, period: int) -> bytes:
    """A periodic part surface of any aspect ratio; ``period`` sets the product, ``seed`` the sensor noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(width, height)
    base = np.stack([
        0.5 + 0.25 * np.sin(2 * np.pi * period * xx),
        0.5 + 0.25 * np.cos(2 * np.pi * (period // 2 + 1) * yy),
        0.5 + 0.2 * np.sin(2 * np.pi * period * (xx + yy)),
    ], axis=-1)
    arr = (np.clip(base + rng.normal(0, 0.03, base.shape), 0, 1) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def upload(category: str, seed: int) -> tuple[str, tuple[str, bytes, str]]:
    width, height, _ = PRODUCTS[category]
    period = 3 + 2 * list(PRODUCTS).index(category)
    return ("files", (f"{category}-{seed}.png", part_png(seed, width, height, period), "image/png"))


def heat(prediction: dict) -> np.ndarray:
    data = prediction["heatmap"]
    return np.frombuffer(base64.b64decode(data["data"]), "<f2").reshape(data["shape"]).astype(np.float32)


def test_a_burst_mixing_frames_and_tiles_answers_every_request_like_each_alone(tmp_path, tiny_backbone):
    settings = Settings(_env_file=None, backbone="test:tiny-clip", device="cpu", store=tmp_path / "store",
                        admin_keys=["admin-key"], client_keys=["client-key"], max_batch_wait_ms=300, max_batch_size=32)
    burst = [(c, 100 + i) for i in range(PER_PRODUCT) for c in PRODUCTS]

    async def predict(client: httpx.AsyncClient, category: str, seed: int) -> dict:
        r = await client.post(f"/v1/categories/{category}/predict?heatmap=raw", headers=CLIENT,
                              files=[upload(category, seed)])
        assert r.status_code == 200, r.text
        return r.json()["predictions"][0]

    async def scenario(base: str) -> tuple[list[dict], list[dict]]:
        async with httpx.AsyncClient(base_url=base, timeout=CLIENT_TIMEOUT_S) as client:
            for category, (_, _, geometry) in PRODUCTS.items():
                r = await client.post(f"/v1/categories/{category}/shots", headers=ADMIN,
                                      files=[upload(category, s) for s in range(4)],
                                      data={"finetune": "false", **geometry})
                assert r.status_code == 201, r.text
            await predict(client, "square-a", 1)  # warm-up: first lazy inits done before the burst
            together = await asyncio.gather(*(predict(client, c, s) for c, s in burst))
            alone = [await predict(client, c, s) for c, s in burst]  # one at a time: a batch of one each
            return together, alone

    with threaded_server(settings, backbone=tiny_backbone) as base:
        together, alone = asyncio.run(scenario(base))

    # a group holds at most PER_PRODUCT images of one product: anything larger was two products in one forward
    assert max(p["batch_size"] for p in together) > PER_PRODUCT
    assert all(p["batch_size"] == 1 for p in alone)
    for mixed, lone, (category, _) in zip(together, alone, burst, strict=True):
        assert mixed["category"] == lone["category"] == category
        assert abs(mixed["score"] - lone["score"]) < SCORE_TOLERANCE, category
        assert mixed["heatmap"]["shape"] == lone["heatmap"]["shape"]
        assert np.abs(heat(mixed) - heat(lone)).max() < MAP_TOLERANCE, category
    scores = {p["category"]: round(p["score"], 3) for p in alone}
    assert len(set(scores.values())) > len(PRODUCTS) // 2  # the products really differ, not one model six times
