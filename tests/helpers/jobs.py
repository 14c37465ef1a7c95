"""Shared by the test modules (first written for tests/test_app_jobs.py)."""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path

import numpy as np
from fastapi.testclient import TestClient
from PIL import Image

from app.core.config import Settings
from model_store.adapters import load_adapter
from training.fewshot import FewShotResult
from training.progress import Cancelled, Progress

ADMIN = {"Authorization": "Bearer admin-key"}


def image_bytes(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray((96 + rng.integers(0, 64, (64, 64, 3))).astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def shots(seeds) -> list:
    return [("files", (f"s{s}.png", image_bytes(s), "image/png")) for s in seeds]


class Script:
    """Builds ``ScriptedTrainer``s: ``steps`` steps of ``delay`` s, optional failure, chosen promotability."""

    def __init__(self, *, steps: int = 3, delay: float = 0.0, promotable: bool = True, fail_at: int | None = None):
        self.steps, self.delay, self.promotable, self.fail_at = steps, delay, promotable, fail_at
        self.started = threading.Event()
        self.closed = 0
        self.configs: list = []
        self.baselines: list = []  # the memory baseline the runner handed each trainer (None: fit it)
        self.store = None  # the app's AdapterStore, set by start()

    def __call__(self, detector, images, *, category, object_name=None, config, progress=None, cancel=None,
                 defects=(), geometry=None, baseline=None):
        self.configs.append(config)
        self.baselines.append(baseline)
        return ScriptedTrainer(self, detector, images, category, cancel)


class ScriptedTrainer:
    def __init__(self, script: Script, detector, images, category, cancel):
        self.script, self.detector, self.category, self.cancel = script, detector, category, cancel

    def steps(self):
        s = self.script
        for i in range(1, s.steps + 1):
            if self.cancel.cancelled:
                raise Cancelled("training cancelled")
            s.started.set()
            time.sleep(s.delay)
            if s.fail_at == i:
                raise RuntimeError(f"boom at step {i}")
            yield Progress("train", i, s.steps, loss=1.0 / i, elapsed=i * s.delay)

    def result(self) -> FewShotResult:
        adapter, _ = load_adapter(self.script.store, self.detector, self.category)  # stands in for a fine-tune
        adapter.version = None
        metrics = {"auroc_memory": 0.5, "auroc_finetuned": 0.9 if self.script.promotable else 0.4,
                   "steps": self.script.steps}
        return FewShotResult(adapter, adapter, metrics, 0.01, self.script.promotable, {"steps": self.script.steps})

    def result_steps(self):
        yield
        return self.result()

    def close(self) -> None:
        self.script.closed += 1


def make_settings(store: Path) -> Settings:
    return Settings(_env_file=None, backbone="test:tiny-clip", device="cpu", store=store, admin_keys=["admin-key"],
                    client_keys=["client-key"], finetune_steps=7, finetune_seconds=120)


def register(client: TestClient, category: str, seeds=range(4)) -> None:
    r = client.post(f"/v1/categories/{category}/shots", headers=ADMIN, files=shots(seeds), data={"finetune": "false"})
    assert r.status_code == 201, r.text


def wait_state(client: TestClient, job_id: str, states: set[str], timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    job: dict = {}
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}", headers=ADMIN).json()
        if job["state"] in states:
            return job
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} never reached {states}: {job}")
