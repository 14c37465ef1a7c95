"""clipshot on a real local Ray cluster (``clipshot serve-ray`` as a subprocess), killed mid-load.

One bounded scenario (about 90 s on 2 cores), because a Ray cluster is expensive to start: 2 detector
replicas of the tiny CLIP and 1 fine-tune worker sharing a store folder and a real PostgreSQL job database;
products registered and a fine-tune queued through the API (it must run on the worker, not a detector);
4 client threads predicting in a loop; a threshold change and a rollback made through the API mid-load;
one replica SIGKILLed mid-load. Asserted: every answer is a 200 or a retryable 503 (never a 500 or a
dropped connection), every 200 after an activation answered carries the new version, Ray replaces the dead
replica, and each product keeps landing on the replica that holds its adapter.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass

import httpx
import pytest
from live_server import ADMIN as ADMIN_KEY
from live_server import CLIENT as CLIENT_KEY
from live_server import live_server
from pg_fixtures import in_ci

from tests.conftest import REPO
from tests.helpers.jobs import image_bytes, shots
from tests.helpers.processes import free_port, serve_command

if not in_ci():
    pytest.importorskip("ray", reason="the ray extra is not installed (pip install -e '.[ray]'); CI installs it")
STARTUP_TIMEOUT_S = 180
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
CLIENT = {"Authorization": f"Bearer {CLIENT_KEY}"}
PRODUCTS = ("widget", "gadget")
# Each replica holds ONE adapter (CLIPSHOT_ADAPTER_CACHE_DEVICE=1 and _CPU=0, which also size Ray's LRU), so
# with 2 products on 2 replicas affinity routing settles each product on its own replica; random routing
# would put ~50 % of a product's requests on either (and reload adapters all the time). 0.8 separates the
# two with margin, measured over each product's last SETTLED answers before the kill.
AFFINITY_SHARE = 0.8
SETTLED = 20


@dataclass
class Answer:
    sent: float
    done: float
    product: str
    status: int
    replica: str | None
    version: int | None


def pid_of(replica: str) -> int:
    """``<ray replica id>@host:pid`` -> pid."""
    return int(replica.rsplit(":", 1)[1])


@pytest.fixture
def cluster(tmp_path, postgres_url):
    env = {"CLIPSHOT_JOB_DB": postgres_url, "CLIPSHOT_RAY_MIN_REPLICAS": "2", "CLIPSHOT_RAY_MAX_REPLICAS": "2",
           "CLIPSHOT_RAY_NUM_CPUS": "0.5", "CLIPSHOT_RAY_NUM_GPUS": "0", "CLIPSHOT_ADAPTER_CACHE_DEVICE": "1",
           "CLIPSHOT_ADAPTER_CACHE_CPU": "0",
           "CLIPSHOT_RAY_FINETUNE_WORKERS": "1", "CLIPSHOT_FINETUNE_STEPS": "3", "RAY_USAGE_STATS_ENABLED": "0"}
    with live_server(tmp_path, command="serve-ray", startup_timeout=STARTUP_TIMEOUT_S, stop_timeout=60,
                     **env) as server, httpx.Client(base_url=server.base, timeout=30) as client:
        yield client


def load(client: httpx.Client, stop: threading.Event, answers: list[Answer], index: int) -> None:
    """One closed-loop production line alternating products; transport errors are recorded as status 0."""
    files = [("files", ("part.png", image_bytes(100 + index), "image/png"))]
    n = 0
    while not stop.is_set():
        product = PRODUCTS[(index + n) % len(PRODUCTS)]
        n += 1
        sent = time.monotonic()
        try:
            r = client.post(f"/v1/categories/{product}/predict?heatmap=none", files=files, headers=CLIENT)
        except httpx.TransportError:
            answers.append(Answer(sent, time.monotonic(), product, 0, None, None))
            continue
        body = r.json() if r.status_code == 200 else {}
        answers.append(Answer(sent, time.monotonic(), product, r.status_code, r.headers.get("x-clipshot-replica"),
                              body.get("adapter_version")))


def test_replica_killed_mid_load_gives_only_successes_or_retryable_503s(cluster):
    for product in (*PRODUCTS, "trained"):
        r = cluster.post(f"/v1/categories/{product}/shots", headers=ADMIN, files=shots(range(4)),
                         data={"finetune": "false"})
        assert r.status_code == 201, r.text
    job = cluster.post("/v1/categories/trained/finetune", headers=ADMIN)  # queued by whichever replica answers
    assert job.status_code == 202, job.text
    answers: list[Answer] = []
    stop = threading.Event()
    with httpx.Client(base_url=cluster.base_url, timeout=30) as shared:
        threads = [threading.Thread(target=load, args=(shared, stop, answers, i)) for i in range(4)]
        for t in threads:
            t.start()
        try:
            _wait(lambda: sum(a.status == 200 for a in answers) >= 40, "40 answers before the changes")
            # an activation through the API: afterwards every replica must serve v2, then v1 again
            r = cluster.put("/v1/categories/widget/threshold", headers=ADMIN, json={"target_false_alarm_rate": 0.1})
            assert r.status_code == 200, r.text
            activated = (time.monotonic(), r.json()["version"])
            _wait(lambda: sum(a.sent > activated[0] and a.status == 200 for a in answers) >= 4 * SETTLED,
                  "answers on v2")
            before_kill = [a for a in answers if a.status == 200]
            victim = Counter(a.replica for a in before_kill if a.product == "widget").most_common(1)[0][0]
            os.kill(pid_of(victim), signal.SIGKILL)
            killed = time.monotonic()
            r = cluster.post("/v1/categories/widget/versions/1/activate", headers=ADMIN)
            assert r.status_code == 200, r.text
            rolled_back = time.monotonic()
            # affinity keeps both products on the survivor; unrouted requests (health) reach any replica
            known = {victim, *[b.replica for b in before_kill]}
            seen: list[str] = []
            _wait(lambda: seen.append(cluster.get("/healthz").headers["x-clipshot-replica"]) or seen[-1] not in known,
                  "a replacement replica answering", timeout=120)
            replacement = seen[-1]
            _wait(lambda: sum(a.sent > rolled_back and a.status == 200 for a in answers) >= 40, "answers after")
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=60)

    detector_pids = {pid_of(a.replica) for a in answers if a.replica}
    _wait(lambda: cluster.get(f"/v1/jobs/{job.json()['id']}", headers=ADMIN).json()["state"] == "succeeded",
          "the fine-tune", timeout=120)
    worker = cluster.get(f"/v1/jobs/{job.json()['id']}", headers=ADMIN).json()["worker"]
    assert int(worker.split(":")[1]) not in detector_pids, "a serving replica trained; the fine-tune worker must"

    scraped = cluster.get("/metrics")  # one exposition for every replica: the live detectors and the worker
    assert scraped.status_code == 200, scraped.text
    labelled = {line.split('replica="')[1].split('"')[0] for line in scraped.text.splitlines()
                if line.startswith("process_start_time_seconds{")}  # a series every replica has
    # exactly the live processes: 2 detectors (the replacement, not the dead one) + the fine-tune worker
    assert replacement in labelled and victim not in labelled and len(labelled) == 3, (victim, labelled)

    statuses = Counter(a.status for a in answers)
    print(f"\nanswers by status: {dict(statuses)}; by product and replica: "
          f"{Counter((a.product, a.replica) for a in answers)}")
    assert set(statuses) <= {200, 503}, f"only successes and retryable 503s are allowed: {statuses}"
    widget = [a for a in answers if a.product == "widget" and a.status == 200]
    wrong = [a for a in widget if (a.sent > rolled_back and a.version != 1)
             or (activated[0] < a.sent < killed and a.version != activated[1])]
    assert not wrong, f"{len(wrong)} answers came from a version that was no longer active: {wrong[:3]}"
    assert not [a for a in answers if a.replica == victim and a.sent > killed + 1], "the dead replica answered"
    for product in PRODUCTS:  # affinity: before the kill, each product sticks to one replica
        served = Counter(a.replica for a in [a for a in before_kill if a.product == product][-SETTLED:])
        assert served.most_common(1)[0][1] >= AFFINITY_SHARE * sum(served.values()), (product, served)


def _wait(condition, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_a_replica_that_cannot_start_stops_serve_ray_with_its_reason(tmp_path):
    """Replicas load the model, not the launcher: their failure must still end in one line with the fix."""
    env = {**os.environ, "CLIPSHOT_BACKBONE": "open_clip:ViT-B-16:/nowhere/clip.safetensors", "CLIPSHOT_DEVICE": "cpu",
           "CLIPSHOT_STORE": str(tmp_path / "store"), "CLIPSHOT_ADMIN_KEYS": "admin-key", "PYTHONPATH": str(REPO),
           "RAY_USAGE_STATS_ENABLED": "0", "CLIPSHOT_RAY_NUM_CPUS": "0.5"}
    command = [*serve_command()[:-1], "serve-ray", "--port", str(free_port()), "--log-level", "warning"]
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=STARTUP_TIMEOUT_S)
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 1, done.stderr
    assert last.startswith("clipshot serve-ray: the detector replicas did not start: Cannot load backbone"), last
    assert "/nowhere/clip.safetensors" in last and "Fix: set CLIPSHOT_BACKBONE=" in last, last
