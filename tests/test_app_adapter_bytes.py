"""The adapter cache's tiers are bounded in bytes as well as by count: a few products with large memory banks
must not fill the device or the host however few they are. Over real HTTP (the app's own batcher and worker)."""

from __future__ import annotations

import shutil

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from model_store import AdapterStore
from model_store.adapters import save_adapter
from tests.helpers.predict import CLIENT, files, good, png
from tests.helpers.serving import fit, settings_for

PRODUCTS = ("small", "large", "other")


@pytest.fixture(scope="module")
def template(tmp_path_factory, tiny_detector):
    """Three products, one with twice the shots (twice the bank), fitted once; their adapters' bytes."""
    root = tmp_path_factory.mktemp("adapter-bytes")
    store = AdapterStore(root)
    sizes = {}
    for name, seeds in zip(PRODUCTS, (range(4), range(8), range(10, 14)), strict=True):
        adapter = fit(tiny_detector, name, seeds)
        sizes[name] = adapter.nbytes
        save_adapter(store, tiny_detector, adapter)
    return root, sizes


def _store(template, tmp_path) -> dict[str, int]:
    shutil.copytree(template[0], tmp_path, dirs_exist_ok=True)
    return template[1]


def _predict(client: TestClient, category: str) -> float:
    r = client.post(f"/v1/categories/{category}/predict", headers=CLIENT, files=files(("a.png", png(good(30)))))
    assert r.status_code == 200, r.text
    return r.json()["predictions"][0]["score"]


def test_device_and_host_tiers_stay_within_their_byte_budgets(tmp_path, template):
    sizes = _store(template, tmp_path)
    assert sizes["large"] > 1.5 * sizes["small"]  # the bank grows with the shots: bytes, not count, differ
    alone = {}
    with TestClient(create_app(settings_for(tmp_path, max_batch_wait_ms=1))) as c:
        alone = {name: _predict(c, name) for name in PRODUCTS}  # defaults: every product fits both tiers
        assert c.app.state.adapter_cache.stats() == {"device": 3, "cpu": 0}
    # Counts that would hold all three; bytes for the large product and not one more on the device, and for
    # any one product on the host.
    budget = sizes["large"] + sizes["small"] // 2
    settings = settings_for(tmp_path, max_batch_wait_ms=1, adapter_cache_device=8, adapter_cache_cpu=8,
                            adapter_cache_device_bytes=budget, adapter_cache_cpu_bytes=budget)
    with TestClient(create_app(settings)) as c:
        cache = c.app.state.adapter_cache
        for name in (*PRODUCTS, "large", "small"):
            assert abs(_predict(c, name) - alone[name]) < 1e-6  # evicted and reloaded: the same answer
            held = cache.bytes_held()
            assert held["device"] <= budget and held["cpu"] <= budget, held
            assert cache.stats()["device"] == 1  # no two products fit the device budget together
        text = c.get("/metrics").text
        assert f'clipshot_adapter_cache_bytes{{tier="device"}} {float(sizes["small"])}' in text  # last served
        assert 'clipshot_adapter_cache_evictions_total{tier="device"} 4.0' in text


def test_a_product_larger_than_the_device_budget_is_still_served(tmp_path, template):
    sizes = _store(template, tmp_path)
    settings = settings_for(tmp_path, max_batch_wait_ms=1, adapter_cache_device_bytes=sizes["small"] // 2,
                            adapter_cache_cpu_bytes=sizes["small"] // 2)
    with TestClient(create_app(settings)) as c:
        for name in PRODUCTS:
            _predict(c, name)
            assert c.app.state.adapter_cache.stats() == {"device": 1, "cpu": 0}  # served, then kept alone
