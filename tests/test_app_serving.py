"""Serving machinery: device worker priorities and OOM, micro-batching, hot swap, LoRA residency, metrics, probes."""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import threading
import time

import pytest
import torch
from fastapi.testclient import TestClient

from app.errors import OverloadedError
from app.main import create_app
from app.serving.device_worker import PREDICT, TRAIN, DeviceWorker
from clipshot import lora
from clipshot.backbone import load_backbone
from model_store import AdapterStore
from model_store.adapters import save_adapter
from tests.helpers.predict import CLIENT, defect, files, good, png
from tests.helpers.serving import fit, serving, settings_for, total

# -- device worker --------------------------------------------------------------------------------


def test_device_worker_turns_oom_into_503_and_keeps_running():
    worker = DeviceWorker()
    worker.start()
    try:
        def boom():
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

        with pytest.raises(OverloadedError) as info:
            worker.submit(boom).result(timeout=5)
        assert info.value.status_code == 503 and int(info.value.headers["Retry-After"]) >= 1
        assert worker.submit(lambda: 41 + 1).result(timeout=5) == 42
        with pytest.raises(ZeroDivisionError):
            worker.submit(lambda: 1 / 0).result(timeout=5)
        assert worker.running
    finally:
        worker.stop()


def test_prediction_work_overtakes_queued_training_steps():
    worker = DeviceWorker()
    worker.start()
    gate, order = threading.Event(), []
    try:
        blocker = worker.submit(gate.wait)
        futures = [worker.submit(lambda n=n: order.append(n), priority=p)
                   for n, p in (("train-1", TRAIN), ("train-2", TRAIN), ("predict-1", PREDICT), ("predict-2", PREDICT))]
        gate.set()
        blocker.result(timeout=5)
        for future in futures:
            future.result(timeout=5)
        assert order == ["predict-1", "predict-2", "train-1", "train-2"]
    finally:
        worker.stop()


# -- HTTP behaviour under concurrency --------------------------------------------------------------


@pytest.fixture(scope="module")
def two_versions_template(tmp_path_factory, tiny_detector):
    """widget v1 (active) and v2 (inactive, fitted on other shots), built once per module."""
    root = tmp_path_factory.mktemp("two-versions")
    store = AdapterStore(root)
    save_adapter(store, tiny_detector, fit(tiny_detector, "widget"))
    save_adapter(store, tiny_detector, fit(tiny_detector, "widget", range(4, 8)), activate=False)
    return root


@pytest.fixture()
def two_versions(two_versions_template, tmp_path):
    """A private copy per test: tests switch the active version."""
    root = tmp_path / "store"
    shutil.copytree(two_versions_template, root)
    return root, AdapterStore(root)


def test_oom_during_a_batch_is_503_with_retry_after_then_service_recovers(two_versions, monkeypatch):
    root, _ = two_versions
    with TestClient(create_app(settings_for(root, max_batch_wait_ms=1))) as c:
        detector = c.app.state.detector
        real_forward = detector.forward
        calls = []

        def oom_once(pixels, adapter):
            calls.append(1)
            if len(calls) == 1:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory")
            return real_forward(pixels, adapter)

        monkeypatch.setattr(detector, "forward", oom_once)
        upload = files(("a.png", png(good())))
        r = c.post("/v1/categories/widget/predict", headers=CLIENT, files=upload)
        assert r.status_code == 503 and r.json()["error"]["code"] == "device_out_of_memory"
        assert int(r.headers["Retry-After"]) >= 1
        again = c.post("/v1/categories/widget/predict", headers=CLIENT, files=upload)
        assert again.status_code == 200 and len(calls) == 2
        assert c.get("/readyz").status_code == 200


def test_concurrent_requests_share_one_forward(two_versions):
    root, _ = two_versions
    app = create_app(settings_for(root, max_batch_wait_ms=300, max_batch_size=32))

    async def scenario():
        async with serving(app) as client:
            await client.post("/v1/categories/widget/predict", headers=CLIENT, files=files(("w.png", png(good()))))
            before = total((await client.get("/metrics")).text, "clipshot_batch_size_count")
            responses = await asyncio.gather(*(
                client.post("/v1/categories/widget/predict", headers=CLIENT, files=files((f"{i}.png", png(good(i)))))
                for i in range(8)))
            text = (await client.get("/metrics")).text
            return responses, before, text

    responses, before, text = asyncio.run(scenario())
    assert all(r.status_code == 200 for r in responses)
    batches = total(text, "clipshot_batch_size_count") - before
    images = total(text, "clipshot_batch_size_sum")
    assert images > total(text, "clipshot_batch_size_count")
    assert batches < 8 and images == 9
    assert max(r.json()["predictions"][0]["batch_size"] for r in responses) > 1


def test_lone_request_on_an_idle_device_does_not_wait_for_the_batch_window(two_versions):
    """With the longest allowed window (1 s), a request that finds the device idle must still start at once:
    queue time under half the window (500 ms is far above tiny-CLIP scheduling noise)."""
    root, _ = two_versions
    with TestClient(create_app(settings_for(root, max_batch_wait_ms=1000))) as c:
        upload = files(("a.png", png(good())))
        for _ in range(2):  # the second one too: the first batch's slot must have been handed back
            r = c.post("/v1/categories/widget/predict", headers=CLIENT, files=upload)
            assert r.status_code == 200, r.text
            assert r.json()["predictions"][0]["timings"]["queue_ms"] < 500


def test_hot_swap_under_load_fails_no_request(two_versions):
    root, store = two_versions
    app = create_app(settings_for(root, max_batch_wait_ms=5, max_batch_size=8))
    one = files(("part.png", png(defect())))

    async def scenario():
        async with serving(app) as client:
            async def predict():
                return await client.post("/v1/categories/widget/predict", headers=CLIENT, files=one)

            early = [asyncio.create_task(predict()) for _ in range(25)]
            await asyncio.wait(early, return_when=asyncio.FIRST_COMPLETED)  # v1 is serving, the rest in flight
            in_flight = sum(not task.done() for task in early)
            await asyncio.to_thread(store.activate, "widget", 2)
            app.state.adapter_cache.invalidate("widget")  # what the activate endpoint does
            late = [asyncio.create_task(predict()) for _ in range(25)]
            return await asyncio.gather(*early), await asyncio.gather(*late), in_flight

    early, late, in_flight = asyncio.run(scenario())
    assert in_flight > 0  # the swap really happened under load
    assert all(r.status_code == 200 for r in early + late), [r.text for r in early + late if r.status_code != 200]
    versions = [r.json()["predictions"][0]["adapter_version"] for r in early + late]
    assert set(versions) == {1, 2}
    assert all(r.json()["adapter_version"] == 2 for r in late)  # sent after activation: new version only
    scores = {r.json()["adapter_version"]: r.json()["predictions"][0]["score"] for r in early + late}
    assert len(set(scores.values())) == len(scores)  # v1 and v2 really are different adapters


def test_activation_switch_is_visible_in_adapter_version(two_versions):
    root, store = two_versions
    upload = files(("a.png", png(good())))
    with TestClient(create_app(settings_for(root, max_batch_wait_ms=1))) as c:
        def version():
            r = c.post("/v1/categories/widget/predict", headers=CLIENT, files=upload)
            assert r.status_code == 200, r.text
            return r.json()["predictions"][0]["adapter_version"]

        assert version() == 1
        store.activate("widget", 2)
        assert version() == 2
        store.rollback("widget")
        assert version() == 1


@pytest.mark.parametrize("merge", ["off", "on"])
def test_lru_device_tier_detaches_lora_and_reattaches_on_demand(tmp_path, tiny_detector, merge):
    """Capacity 1: serving a second LoRA category evicts the first from the backbone; both keep working, with the
    LoRA run as a branch or folded into the weights (then the frozen weights must be back after each eviction).

    The category name contains a '.', which a LoRA module name may not: the cache must not use it verbatim.
    """
    visual = load_backbone("test:tiny-clip").visual  # a private copy: the session backbone stays LoRA-free
    spec = lora.LoraSpec(rank=2)
    lora.add_adapter(visual, "scratch", spec)
    state = lora.state(visual, "scratch")
    store = AdapterStore(tmp_path)
    base = fit(tiny_detector, "alpha.v2")
    for category in ("alpha.v2", "beta"):
        lora_state = {k: v + 0.01 for k, v in state.items()}
        save_adapter(store, tiny_detector, dataclasses.replace(base, category=category, lora=spec,
                                                               lora_state=lora_state))
    upload = files(("a.png", png(good())))
    settings = settings_for(tmp_path, max_batch_wait_ms=1, adapter_cache_device=1, lora_merge=merge)
    with TestClient(create_app(settings)) as c:
        scores = {}
        for category in ("alpha.v2", "beta", "alpha.v2"):
            r = c.post(f"/v1/categories/{category}/predict", headers=CLIENT, files=upload)
            assert r.status_code == 200, r.text
            scores.setdefault(category, []).append(r.json()["predictions"][0]["score"])
            resident = c.app.state.detector.resident()
            assert len(resident) == 1 and resident == {c.app.state.adapter_cache.get(category).uid}
            visual = c.app.state.detector.backbone.visual
            assert lora.folded_adapter(visual) == (next(iter(resident)) if merge == "on" else None)
        first, again = scores["alpha.v2"]
        assert abs(first - again) < 1e-6  # re-attached after eviction: the same adapter, the same answer
        text = c.get("/metrics").text
        assert 'clipshot_adapter_cache_evictions_total{tier="device"} 2.0' in text
        assert 'clipshot_adapters_resident{tier="device"} 1.0' in text


def test_metrics_expose_moving_latency_stage_and_cache_families(two_versions):
    root, _ = two_versions
    route = "/v1/categories/{category}/predict"
    moving = [("clipshot_http_request_duration_seconds_count", {"route": route, "method": "POST", "status": "200"}),
              ("clipshot_http_request_duration_seconds_sum", {"route": route}),
              *[("clipshot_inference_stage_seconds_count", {"stage": s, "category": "widget"})
                for s in ("decode", "preprocess", "postprocess")],
              ("clipshot_batch_forward_seconds_count", {"category": "widget"}),
              ("clipshot_batch_forward_seconds_sum", {}),
              ("clipshot_adapter_cache_hits_total", {"tier": "cpu"}),
              ("clipshot_adapter_cache_hits_total", {"tier": "device"}),
              ("clipshot_batch_size_count", {}),
              ("clipshot_predictions_total", {"category": "widget"})]
    upload = files(("a.png", png(good())))
    with TestClient(create_app(settings_for(root, max_batch_wait_ms=1))) as c:
        assert c.post("/v1/categories/widget/predict", headers=CLIENT, files=upload).status_code == 200
        assert c.post("/v1/categories/widget/predict", headers=CLIENT, files=upload).status_code == 200
        first = c.get("/metrics")
        assert first.status_code == 200 and first.headers["content-type"].startswith("text/plain")
        for _ in range(2):
            assert c.post("/v1/categories/widget/predict", headers=CLIENT, files=upload).status_code == 200
        second = c.get("/metrics").text
    for name, labels in moving:
        assert total(second, name, **labels) > total(first.text, name, **labels) > 0, (name, labels)
    assert total(second, "clipshot_adapter_cache_misses_total", tier="cpu") == 1  # loaded once, then cached
    assert total(second, "clipshot_queue_depth", queue="train") == 0
    assert total(second, "clipshot_adapters_resident", tier="device") == 1


def test_metrics_key_protection_and_probes(two_versions):
    root, _ = two_versions
    with TestClient(create_app(settings_for(root, metrics_require_key=True))) as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        ready = c.get("/readyz")
        assert ready.status_code == 200 and ready.json()["status"] == "ready"
        assert ready.json()["backbone"] == "test:tiny-clip"
        assert c.get("/metrics").status_code == 401
        assert c.get("/metrics", headers=CLIENT).status_code == 200
        start = time.perf_counter()
        assert c.get("/readyz").json()["checked_seconds_ago"] >= 0  # cached: no second probe needed
        assert time.perf_counter() - start < 5
        assert c.get("/docs").status_code == 200
        assert "/v1/categories/{category}/predict" in c.get("/openapi.json").json()["paths"]


def test_failed_residency_is_rolled_back_not_trusted_later(tmp_path):
    """If attaching an adapter fails on the device (OOM, bad tensors), nothing of it may stay resident, and the
    next request must retry (and fail again) instead of being served by a half-attached or LoRA-less model."""
    from app.metrics import Metrics
    from app.serving.adapter_cache import AdapterCache
    from clipshot.detector import Detector

    detector = Detector(load_backbone("test:tiny-clip"))  # private: the session backbone stays LoRA-free
    spec = lora.LoraSpec(rank=2)
    lora.add_adapter(detector.backbone.visual, "scratch", spec)
    state = {k: v + 0.01 for k, v in lora.state(detector.backbone.visual, "scratch").items()}
    lora.remove_adapter(detector.backbone.visual, "scratch")
    state[list(state)[-1]] = torch.zeros(3, 3)  # breaks after the other tensors were copied in
    adapter = dataclasses.replace(fit(detector, "widget"), lora=spec, lora_state=state)
    cache = AdapterCache(AdapterStore(tmp_path), detector, Metrics(), DeviceWorker(), device_capacity=2,
                         cpu_capacity=2)
    for _ in range(2):
        with pytest.raises(ValueError, match="has shape"):
            cache.ensure_resident(adapter)
        assert detector.resident() == set() and adapter.memory.layers[0].device.type == "cpu"


def test_overload_is_refused_at_once_with_503(two_versions):
    """With the device stuck and ``max_pending_images`` images already admitted, the next request must get 503 +
    Retry-After immediately (not queue), and the admitted one must still complete once the device frees up."""
    root, _ = two_versions
    app = create_app(settings_for(root, max_batch_wait_ms=1, max_pending_images=4, max_predict_images=4))
    four = files(*[(f"{i}.png", png(good(i))) for i in range(4)])

    async def scenario():
        async with serving(app) as client:
            assert (await client.post("/v1/categories/widget/predict", headers=CLIENT, files=four)).status_code == 200
            gate = threading.Event()
            app.state.device_worker.submit(gate.wait)  # the device is busy until the gate opens
            try:
                admitted = asyncio.create_task(
                    client.post("/v1/categories/widget/predict", headers=CLIENT, files=four))
                for _ in range(500):
                    if app.state.inference.pending_images == 4:
                        break
                    await asyncio.sleep(0.01)
                depth = total((await client.get("/metrics")).text, "clipshot_queue_depth", queue="admitted")
                started = time.perf_counter()
                refused = await client.post("/v1/categories/widget/predict", headers=CLIENT,
                                            files=files(("x.png", png(good()))))
                refused_s = time.perf_counter() - started
            finally:
                gate.set()
            return await admitted, refused, refused_s, depth, app.state.inference.pending_images

    admitted, refused, refused_s, depth, left = asyncio.run(scenario())
    assert depth == 4 and left == 0
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "overloaded"
    assert int(refused.headers["Retry-After"]) >= 1 and refused_s < 5  # answered while the device was still stuck
    assert admitted.status_code == 200 and len(admitted.json()["predictions"]) == 4
