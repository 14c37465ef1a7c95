"""Mixed-product traffic through the service: concurrent requests for different products (LoRA ones included)
share one backbone forward, and every answer equals the one the product gets alone."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
import torch

from app.main import create_app
from clipshot import lora
from clipshot.backbone import load_backbone
from clipshot.detector import Detector
from model_store import AdapterStore
from model_store.adapters import save_adapter
from tests.helpers.predict import CLIENT, files, good, png
from tests.helpers.serving import fit, serving, settings_for, total

CATEGORIES = ("plain-a", "plain-b", "lora-x", "lora-y")
PER_CATEGORY = 2  # requests per product in the burst: a batch bigger than this mixed products
TOLERANCE = 1e-4  # fp32 batched vs lone forward differ by ~1e-6 (tests/test_core_mixed_batch.py)


@pytest.fixture(scope="module")
def backbone():
    return load_backbone("test:tiny-clip")  # private: LoRAs get attached to it


@pytest.fixture()
def four_products(tmp_path, backbone):
    """Two memory products and two LoRA products (random non-zero LoRA, so it changes the features)."""
    detector = Detector(backbone)
    store = AdapterStore(tmp_path / "store")
    gen = torch.Generator().manual_seed(1)
    for i, category in enumerate(CATEGORIES):
        adapter = fit(detector, category, range(4 * i, 4 * i + 4))
        if category.startswith("lora"):
            spec = lora.LoraSpec(rank=4)
            lora.add_adapter(backbone.visual, "shape", spec)
            shapes = lora.state(backbone.visual, "shape")
            lora.remove_adapter(backbone.visual, "shape")
            adapter = dataclasses.replace(adapter, lora=spec, lora_state={
                k: 0.05 * torch.randn(v.shape, generator=gen) for k, v in shapes.items()})
        save_adapter(store, detector, adapter)
    return tmp_path / "store"


def test_mixed_product_burst_shares_forwards_and_scores_like_lone_requests(four_products, backbone):
    app = create_app(settings_for(four_products, max_batch_wait_ms=300, max_batch_size=32), backbone=backbone)
    burst = [(c, 30 + i) for i in range(PER_CATEGORY) for c in CATEGORIES]

    async def predict(client, category: str, seed: int):
        r = await client.post(f"/v1/categories/{category}/predict?heatmap=none", headers=CLIENT,
                              files=files(("p.png", png(good(seed)))))
        assert r.status_code == 200, r.text
        return r.json()["predictions"][0]

    async def scenario():
        async with serving(app) as client:
            await predict(client, "plain-a", 1)  # warm-up: adapters loaded, first lazy inits done
            before = total((await client.get("/metrics")).text, "clipshot_batch_size_count")
            together = await asyncio.gather(*(predict(client, c, s) for c, s in burst))
            batches = total((await client.get("/metrics")).text, "clipshot_batch_size_count") - before
            alone = [await predict(client, c, s) for c, s in burst]  # one at a time: batch of 1 each
            return together, batches, alone

    together, batches, alone = asyncio.run(scenario())
    assert max(p["batch_size"] for p in together) > PER_CATEGORY  # a forward held several products' images
    assert batches < len(burst) / PER_CATEGORY  # fewer forwards than one per product group
    assert all(p["batch_size"] == 1 for p in alone)
    for mixed, lone, (category, _) in zip(together, alone, burst, strict=True):
        assert mixed["category"] == lone["category"] == category
        assert abs(mixed["score"] - lone["score"]) < TOLERANCE
    scores = {p["category"]: p["score"] for p in alone}
    assert len({round(s, 3) for s in scores.values()}) == len(CATEGORIES)  # the products really differ


def test_batch_is_split_when_it_holds_more_products_than_the_hot_tier(four_products, backbone):
    app = create_app(settings_for(four_products, max_batch_wait_ms=300, adapter_cache_device=2), backbone=backbone)

    async def scenario():
        async with serving(app) as client:
            async def predict(category: str, seed: int):
                r = await client.post(f"/v1/categories/{category}/predict?heatmap=none", headers=CLIENT,
                                      files=files(("p.png", png(good(seed)))))
                return r.status_code, r.json()
            await predict("plain-a", 1)
            return await asyncio.gather(*(predict(c, 30 + i) for i in range(PER_CATEGORY) for c in CATEGORIES))

    results = asyncio.run(scenario())
    assert all(code == 200 for code, _ in results), results
    # two products per device task at most: a batch is never bigger than two products' share of the burst
    assert max(body["predictions"][0]["batch_size"] for _, body in results) <= 2 * PER_CATEGORY
    assert app.state.adapter_cache.stats()["device"] <= 2
