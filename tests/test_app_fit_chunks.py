"""Fits share the device in bounded chunks: a registration of one product never holds back another's verdicts."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from test_app_predict import ADMIN, CLIENT, KEYS, files, good, png
from threaded_server import threaded_server

from app.core.config import Settings
from app.errors import OverloadedError
from app.main import create_app
from app.services.device_worker import PREDICT, TRAIN, DeviceWorker

WAIT_S = 120  # generous bound for any one wait on a shared 2-core machine; never reached when things work


def test_prediction_tasks_overtake_a_chunked_fit_between_its_chunks():
    worker = DeviceWorker()
    worker.start()
    release, order = threading.Event(), []

    def fit():
        order.append("fit-0")
        yield
        release.wait(WAIT_S)  # the second chunk is on the device when the prediction arrives
        order.append("fit-1")
        yield
        order.append("fit-2")
        return "fitted"

    try:
        future = worker.submit_steps(fit(), priority=TRAIN)
        deadline = time.monotonic() + WAIT_S
        while "fit-0" not in order:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        predict = worker.submit(lambda: order.append("predict"), priority=PREDICT)
        release.set()
        predict.result(timeout=WAIT_S)
        assert future.result(timeout=WAIT_S) == "fitted"
        assert order == ["fit-0", "fit-1", "predict", "fit-2"]  # one chunk ahead of it, not the whole fit
        assert worker.tasks_done == {"train": 3, "predict": 1}
    finally:
        worker.stop()


def test_a_failing_chunk_fails_the_future_and_stop_fails_a_fit_under_way():
    worker = DeviceWorker()
    worker.start()
    try:
        def broken():
            yield
            raise ValueError("bad shot")

        with pytest.raises(ValueError, match="bad shot"):
            worker.submit_steps(broken()).result(timeout=5)
        assert worker.submit(lambda: 42).result(timeout=5) == 42  # the worker goes on

        gate, closed = threading.Event(), []

        def slow():
            try:
                while True:
                    gate.wait()
                    yield
            finally:
                closed.append(True)

        before = worker.tasks_done["train"]
        future = worker.submit_steps(slow())
        deadline = time.monotonic() + WAIT_S
        while worker.tasks_done["train"] < before + 2:  # under way: its future can no longer simply be cancelled
            gate.set()
            assert time.monotonic() < deadline
            time.sleep(0.001)
    finally:
        worker.stop()
    with pytest.raises(OverloadedError):
        future.result(timeout=5)
    assert closed == [True]


def test_a_predict_on_one_product_completes_while_another_product_registers(tmp_path, tiny_backbone):
    """Product B registers 16 shots (a fit of many device chunks: feature batches, one leave-one-out fold per
    shot); a predict on product A sent once B's fit is on the device must come back while B's fit still has
    device work left, not after it."""
    settings = Settings(backbone="test:tiny-clip", device="cpu", store=tmp_path, max_batch_wait_ms=2,
                        max_shots=16, **KEYS)
    app = create_app(settings, backbone=tiny_backbone)
    with threaded_server(settings, app=app) as base, httpx.Client(base_url=base, timeout=WAIT_S) as http:
        r = http.post("/v1/categories/a/shots", headers=ADMIN, data={"finetune": "false"},
                      files=files(*((f"{s}.png", png(good(s))) for s in range(4))))
        assert r.status_code == 201, r.text
        worker = app.state.device_worker
        before = worker.tasks_done["train"]
        outcome: dict[str, httpx.Response] = {}

        def register_b() -> None:
            outcome["b"] = http.post("/v1/categories/b/shots", headers=ADMIN, data={"finetune": "false"},
                                     files=files(*((f"{s}.png", png(good(s, (96, 96)))) for s in range(100, 116))))

        thread = threading.Thread(target=register_b)
        thread.start()
        deadline = time.monotonic() + WAIT_S
        while worker.tasks_done["train"] == before:  # B's fit has run device work (all of it, as one task)
            assert thread.is_alive() and time.monotonic() < deadline, outcome
            time.sleep(0.002)
        r = http.post("/v1/categories/a/predict?heatmap=none", headers=CLIENT, files=files(("q.png", png(good(7)))))
        done_when_a_answered = worker.tasks_done["train"]
        thread.join(WAIT_S)
        assert r.status_code == 200, r.text
        assert outcome["b"].status_code == 201, outcome["b"].text
        # B's fit still had device chunks to run when A's verdict came back: A did not wait for the whole fit
        assert done_when_a_answered < worker.tasks_done["train"], (before, done_when_a_answered)
