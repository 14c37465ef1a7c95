"""Edits never lost: an operator's threshold change or rollback made while a fine-tune runs survives the job,
two service instances (replicas) editing one product never drop each other's images, and two processes
doing compare-and-set on one category never lose a version or a shot. Real HTTP on loopback, tiny CLIP."""

from __future__ import annotations

import multiprocessing
import threading
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from threaded_server import threaded_server

from app.core.config import Settings
from app.main import create_app
from model_store import AdapterStore, StaleVersion
from model_store.adapters import load_adapter
from tests.helpers.jobs import shots
from training.fewshot import FewShotResult
from training.progress import Progress

ADMIN = {"Authorization": "Bearer admin-key"}
WAIT_S = 60.0  # generous bound for a job on a 2-core box shared with other test runs


def settings(store: Path) -> Settings:
    return Settings(_env_file=None, backbone="test:tiny-clip", device="cpu", store=store, admin_keys=["admin-key"],
                    finetune_steps=3, finetune_seconds=120)


class GatedTrainer:
    """Stands in for ``FewShotTrainer``: holds at its first step until ``release``, then returns the version it
    was started on as its promotable "fine-tuned" adapter, with that version's decision policy (as the real
    trainer does). The trainer is not what these tests examine; what the job does with its result is."""

    def __init__(self) -> None:
        self.started, self.release = threading.Event(), threading.Event()
        self.store: AdapterStore | None = None

    def __call__(self, detector, images, *, category, config, cancel=None, **_):
        adapter, _ = load_adapter(self.store, detector, category)  # the version active when the job started
        adapter.version = None
        gate = self

        class Trainer:
            def steps(self):
                gate.started.set()
                assert gate.release.wait(WAIT_S), "the test never released the trainer"
                yield Progress("train", 1, 1, loss=0.5, elapsed=0.1)

            def result(self) -> FewShotResult:
                metrics = {"auroc_memory": 0.5, "auroc_finetuned": 0.9, "steps": 1}
                return FewShotResult(adapter, adapter, metrics, 0.01, True, {"steps": 1})

            def result_steps(self):  # the chunked form the job runner calls: one device chunk
                yield
                return self.result()

            def close(self) -> None:
                pass

        return Trainer()


def wait_job(client: httpx.Client, job_id: str) -> dict:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["state"] not in ("queued", "running"):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish: {job}")


@pytest.fixture()
def served(tmp_path, tiny_backbone):
    """A real server on loopback with the gated trainer, and an admin HTTP client for it."""
    app = create_app(settings(tmp_path / "store"), backbone=tiny_backbone)
    gate = GatedTrainer()
    with threaded_server(app.state.settings, app=app) as base, \
            httpx.Client(base_url=base, headers=ADMIN, timeout=WAIT_S) as client:
        gate.store = app.state.store
        app.state.job_runner.trainer_factory = gate
        yield client, gate


def register(client: httpx.Client, seeds) -> dict:
    r = client.post("/v1/categories/widget/shots", files=shots(seeds), data={"finetune": "false"})
    assert r.status_code == 201, r.text
    return r.json()


def start_gated_job(client: httpx.Client, gate: GatedTrainer) -> str:
    r = client.post("/v1/categories/widget/finetune", json={})
    assert r.status_code == 202, r.text
    assert gate.started.wait(WAIT_S), "the fine-tune never started"
    return r.json()["id"]


def test_a_threshold_change_during_a_finetune_survives_its_promotion(served):
    client, gate = served
    register(client, range(4))
    job_id = start_gated_job(client, gate)
    r = client.put("/v1/categories/widget/threshold", json={"threshold": 0.123})
    assert r.status_code == 200, r.text
    gate.release.set()
    job = wait_job(client, job_id)
    detail = client.get("/v1/categories/widget").json()
    assert detail["decision"]["policy"] == "manual" and detail["decision"]["threshold"] == 0.123, detail
    assert job["state"] == "succeeded" and job["metrics"]["promotion"] == "promoted", job
    assert detail["active_version"] == job["result_version"]  # the fine-tune serves, at the operator's choice


def test_a_rollback_during_a_finetune_survives_the_job(served):
    client, gate = served
    register(client, range(4))  # v1, automatic threshold
    auto = client.get("/v1/categories/widget").json()["decision"]["threshold"]
    assert client.put("/v1/categories/widget/threshold", json={"threshold": 9.5}).status_code == 200  # v2
    job_id = start_gated_job(client, gate)  # trains from v2 (manual 9.5)
    r = client.post("/v1/categories/widget/versions/1/activate")  # the operator undoes the threshold change
    assert r.status_code == 200, r.text
    gate.release.set()
    job = wait_job(client, job_id)
    decision = client.get("/v1/categories/widget").json()["decision"]
    # v1 differs from v2 by its policy alone, so the fine-tune may serve, but under v1's rule, not v2's.
    assert decision["policy"] == "auto" and decision["threshold"] == pytest.approx(auto, rel=0.5), decision
    assert job["metrics"]["promotion"] == "promoted", job

    # A rollback to different evidence supersedes the job: its version is kept but does not serve.
    register(client, [10])  # v4: one more shot
    gate.started.clear()
    gate.release.clear()
    job_id = start_gated_job(client, gate)  # trains from v4
    assert client.post("/v1/categories/widget/versions/3/activate").status_code == 200
    gate.release.set()
    job = wait_job(client, job_id)
    assert job["state"] == "succeeded" and job["metrics"]["promotion"] == "superseded", job
    assert "superseded" in job["message"]
    detail = client.get("/v1/categories/widget").json()
    assert detail["active_version"] == 3 and job["result_version"] in [v["version"] for v in detail["versions"]]


def test_two_replicas_taking_feedback_for_one_product_keep_every_image(tmp_path, tiny_backbone):
    """Two app instances on one store (as two replicas): each has its own in-process lock, so only the store's
    compare-and-set can stop the later save from dropping the other's image."""
    store = tmp_path / "store"
    with TestClient(create_app(settings(store), backbone=tiny_backbone)) as a, \
            TestClient(create_app(settings(store), backbone=tiny_backbone)) as b:
        r = a.post("/v1/categories/widget/shots", headers=ADMIN, files=shots(range(4)), data={"finetune": "false"})
        assert r.status_code == 201, r.text
        barrier, conflicts, failures = threading.Barrier(2), [], []

        def teach(client: TestClient, seed: int) -> None:
            barrier.wait()
            for _ in range(5):  # a 409 says "retry": the retry applies to the version now serving
                r = client.post("/v1/categories/widget/feedback", headers=ADMIN, data={"label": "good"},
                                files=shots([seed]))
                if r.status_code == 201:
                    return
                if r.status_code != 409:
                    failures.append(r.text)
                    return
                conflicts.append(r)
            failures.append("five conflicts in a row")

        threads = [threading.Thread(target=teach, args=(c, s)) for c, s in ((a, 20), (b, 21))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT_S)
        assert not failures, failures
        listed = {s["file_name"] for s in a.get("/v1/categories/widget/shots", headers=ADMIN).json()["shots"]}
        assert {"s20.png", "s21.png"} <= listed, listed
        for r in conflicts:  # the documented error shape, with a hint to retry
            assert r.json()["error"]["code"] == "version_conflict" and r.headers["retry-after"] == "1"
            assert "retry" in r.json()["error"]["message"].lower()


def test_a_stale_activation_gets_409_over_http(tmp_path, tiny_backbone):
    """A writer that read v2 as active and activates after another replica moved the pointer is refused."""
    store = tmp_path / "store"
    with TestClient(create_app(settings(store), backbone=tiny_backbone)) as client:
        for seeds in (range(3), [7]):
            assert client.post("/v1/categories/widget/shots", headers=ADMIN, files=shots(seeds),
                               data={"finetune": "false"}).status_code == 201
        other = AdapterStore(store)  # another replica's view of the same store
        service = client.app.state.category_service
        original = service._ledger

        async def ledger_then_other_replica_rolls_back(category):
            result = await original(category)
            other.activate("widget", 1)  # lands after this request read the active version
            return result

        service._ledger = ledger_then_other_replica_rolls_back
        r = client.post("/v1/categories/widget/versions/2/activate", headers=ADMIN)
        assert r.status_code == 409 and r.json()["error"]["code"] == "version_conflict", r.text
        assert r.headers["retry-after"] == "1"
        assert other.active_version("widget") == 1  # the other replica's rollback stands


def _edit(root: str, worker: int, edits: int) -> None:
    """One process: add ``edits`` shots one version at a time, retrying each lost compare-and-set."""
    store = AdapterStore(root)
    for i in range(edits):
        while True:
            active = store.active_version("widget")
            manifest = store.manifest("widget", active)
            with store.hold("widget") as held:
                name = store.save_shots("widget", [(f"w{worker}-{i}.png", f"{worker}-{i}".encode())], held=held)[0]
                refs = [r.model_dump(mode="json") for r in manifest.shots]
                refs.append({"name": name, "sha256": name.split(".")[0]})
                time.sleep(0.005)  # a fit takes time: widen the window another writer can use
                try:
                    store.derive("widget", active, {"shots": refs}, expect_active=active)
                    break
                except StaleVersion:
                    store.forget_shots("widget", [name], held)


def test_two_processes_editing_one_category_never_lose_a_version_or_a_shot(tmp_path):
    import torch

    root = tmp_path / "store"
    store = AdapterStore(root)
    store.save("widget", {"bank": torch.zeros(2, 2)}, {"backbone": {"spec": "test:tiny-clip", "sha256": "a" * 64}})
    edits = 8  # per process: enough interleavings on 2 cores to lose shots without the compare-and-set
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_edit, args=(str(root), w, edits)) for w in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    final = store.manifest("widget")
    assert final.version == 1 + 2 * edits and store.versions("widget") == list(range(1, 2 + 2 * edits))
    assert len({r.name for r in final.shots}) == 2 * edits  # every process's every shot
    assert len(store.shot_paths("widget")) == 2 * edits  # and no file of a lost race left behind


def test_slow_store_reads_of_an_edit_do_not_block_the_event_loop(tmp_path, tiny_backbone):
    """The category handlers read manifests and list directories; on a slow disk (network storage) those calls
    must not stall the event loop, or every other request (health probes included) waits behind them."""
    app = create_app(settings(tmp_path / "store"), backbone=tiny_backbone)
    slow_s = 1.5  # one slowed manifest read; a blocked loop would hold /healthz at least this long
    with threaded_server(app.state.settings, app=app) as base, \
            httpx.Client(base_url=base, headers=ADMIN, timeout=WAIT_S) as client:
        register(client, range(3))
        store = app.state.store
        reading = threading.Event()

        def slow_manifest(*args, **kwargs):
            reading.set()
            time.sleep(slow_s)
            return AdapterStore.manifest(store, *args, **kwargs)

        store.manifest = slow_manifest  # this store instance only: the disk got slow
        edit = threading.Thread(target=client.put, args=("/v1/categories/widget/threshold",),
                                kwargs={"json": {"threshold": 0.5}})
        edit.start()
        assert reading.wait(WAIT_S)
        started = time.monotonic()
        assert client.get("/healthz").status_code == 200
        waited = time.monotonic() - started
        edit.join(WAIT_S)
        del store.manifest
    # /healthz takes milliseconds; a third of the slowed read leaves room for a loaded 2-core box.
    assert waited < slow_s / 3, f"/healthz waited {waited:.2f}s behind a store read"
