"""The batcher answers every image it accepts: a failing device task, a wait past the timeout and a dead collector
each end in an error for every waiting request, never in a request that hangs. Real detector, device worker and
adapter cache; the failures are real ones (a stack of unequal pixels, an incompatible adapter, a busy device)."""

from __future__ import annotations

import asyncio
import time
import warnings
from contextlib import asynccontextmanager

import httpx
import pytest
import torch
from conftest import textured
from PIL import Image

from app.core.config import Settings
from app.errors import OverloadedError
from app.main import create_app
from app.metrics import Metrics
from app.services.adapter_cache import AdapterCache
from app.services.batcher import Batcher, _Item
from app.services.device_worker import DeviceWorker
from clipshot.adapter import Adapter
from model_store import AdapterStore

# The device is held by a sleep this long while the batcher is watched: long against the 0.2 s timeout and the
# collector's reaction (both immediate on an idle loop), short enough for the suite.
BUSY_S = 1.5
TIMEOUT_S = 0.2
ANSWER_S = 10.0  # every awaited answer must come well within this; only a hang would exceed it


@pytest.fixture(scope="module")
def product(tiny_detector) -> Adapter:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tiny_detector.fit_memory([Image.fromarray(textured(s)) for s in range(4)], category="p",
                                        text=False, calibration_views=0)


@asynccontextmanager
async def running(detector, tmp_path, **kw):
    metrics = Metrics()
    worker = DeviceWorker(metrics)
    worker.start()
    cache = AdapterCache(AdapterStore(tmp_path), detector, metrics, worker, device_capacity=4, cpu_capacity=4)
    batcher = Batcher(detector, worker, cache, metrics, max_batch_size=8, max_wait_ms=50, **kw)
    await batcher.start()
    try:
        yield batcher, worker
    finally:
        await batcher.stop()
        worker.stop()


def pixels(detector, adapter: Adapter) -> torch.Tensor:
    return detector.backbone.preprocess([Image.fromarray(textured(40))], adapter.geometry)[0]


def test_a_group_that_fails_resolves_every_future_with_the_error(tiny_detector, product, tmp_path):
    """Pixels that cannot be stacked (a grouping bug) fail inside the group run: every image gets the error."""
    async def scenario():
        async with running(tiny_detector, tmp_path) as (batcher, _):
            loop = asyncio.get_running_loop()
            shapes = [(3, 64, 64), (3, 40, 104), (3, 64, 64)]
            group = [_Item(product, torch.zeros(shape), "p", loop.create_future()) for shape in shapes]
            await batcher._run_group(group)  # returns: the error belongs to the images, not to a lost task
            return group

    group = asyncio.run(scenario())
    assert all(item.future.done() for item in group)
    errors = [item.future.exception() for item in group]
    assert all(isinstance(e, RuntimeError) and "stack expects each tensor to be equal size" in str(e) for e in errors)


def test_a_device_error_fails_every_image_of_its_batch(tiny_detector, product, tmp_path):
    wrong = Adapter(category="old", backbone={**tiny_detector.layout(), "image_size": 999}, memory=product.memory)

    async def scenario():
        async with running(tiny_detector, tmp_path) as (batcher, _):
            image = pixels(tiny_detector, wrong)
            return await asyncio.wait_for(asyncio.gather(
                *(batcher.submit(wrong, image, "old") for _ in range(3)), return_exceptions=True), ANSWER_S)

    results = asyncio.run(scenario())
    assert all(isinstance(r, ValueError) and "image_size=999" in str(r) for r in results), results


def test_an_image_waiting_past_the_timeout_fails_and_the_batcher_goes_on(tiny_detector, product, tmp_path):
    async def scenario():
        async with running(tiny_detector, tmp_path, timeout_s=TIMEOUT_S) as (batcher, worker):
            busy = asyncio.ensure_future(worker.run(lambda: time.sleep(BUSY_S)))  # a long fit holds the device
            await asyncio.sleep(0.05)
            start = time.monotonic()
            with pytest.raises(OverloadedError) as timed_out:
                await asyncio.wait_for(batcher.submit(product, pixels(tiny_detector, product), "p"), ANSWER_S)
            waited = time.monotonic() - start
            await busy
            later = await asyncio.wait_for(batcher.submit(product, pixels(tiny_detector, product), "p"), ANSWER_S)
            return timed_out.value, waited, later

    error, waited, later = asyncio.run(scenario())
    assert error.code == "predict_timeout" and error.status_code == 503
    assert waited < BUSY_S  # it gave up at its timeout, not when the device came free
    assert later.batch_size == 1 and torch.isfinite(torch.tensor(later.score))


def test_a_dead_collector_fails_queued_images_and_refuses_new_ones_at_once(tiny_detector, product, tmp_path):
    async def scenario():
        async with running(tiny_detector, tmp_path, max_inflight=1) as (batcher, worker):
            busy = asyncio.ensure_future(worker.run(lambda: time.sleep(BUSY_S)))
            await asyncio.sleep(0.05)
            image = pixels(tiny_detector, product)
            first = asyncio.ensure_future(batcher.submit(product, image, "p"))  # dispatched, waits for the device
            await asyncio.sleep(0.1)
            queued = asyncio.ensure_future(batcher.submit(product, image, "p"))  # waits for the one device slot
            await asyncio.sleep(0.1)
            batcher._collector.cancel()  # the collector dies (as an unexpected error would end it)
            queued_error = await asyncio.wait_for(asyncio.gather(queued, return_exceptions=True), ANSWER_S)
            start = time.monotonic()
            with pytest.raises(OverloadedError) as refused:
                await asyncio.wait_for(batcher.submit(product, image, "p"), ANSWER_S)
            refused_after = time.monotonic() - start
            await busy
            return queued_error[0], refused.value, refused_after, await asyncio.wait_for(first, ANSWER_S)

    queued_error, refused, refused_after, first = asyncio.run(scenario())
    assert isinstance(queued_error, OverloadedError) and queued_error.code == "batcher_failed"
    assert refused.code == "batcher_failed" and refused_after < 0.5  # refused at once, not after any wait
    assert first.batch_size == 1  # the image already on its way to the device still got its answer


def test_a_replica_whose_collector_died_is_not_ready(tmp_path, tiny_backbone):
    """The device still answers, but every predict would be refused: the readiness probe must say so."""
    app = create_app(Settings(_env_file=None, backbone="test:tiny-clip", device="cpu", store=tmp_path / "store",
                              admin_keys=["admin-key"], client_keys=["client-key"]), backbone=tiny_backbone)

    async def scenario():
        async with app.router.lifespan_context(app), httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://clipshot") as client:
            before = await client.get("/readyz")
            app.state.batcher._collector.cancel()
            await asyncio.sleep(0.05)  # the cancellation lands on the next loop turn
            return before, await client.get("/readyz")

    before, after = asyncio.run(scenario())
    assert before.status_code == 200
    assert after.status_code == 503 and "batcher stopped" in after.json()["detail"]
