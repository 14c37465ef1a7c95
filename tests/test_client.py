"""The Python client (app/client.py) against a real server on a loopback port: every input kind, typed
results, heatmap helpers, job waiting with progress, and errors that carry the service's code."""

from __future__ import annotations

import numpy as np
import pytest
from threaded_server import free_port, threaded_server

from app.client import Client, ClipshotError, anomaly_mask, encode_image, heatmap_grid, heatmap_image
from app.core.config import Settings
from app.jobs.job_store import Job, JobState
from app.schemas import ShotsRegistered
from app.schemas.prediction import PredictResponse
from tests.helpers.predict import defect, good, png

ADMIN_KEY, CLIENT_KEY = "admin-key", "client-key"


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_backbone):
    settings = Settings(_env_file=None, backbone="test:tiny-clip", device="cpu",
                        store=tmp_path_factory.mktemp("store"), admin_keys=[ADMIN_KEY], client_keys=[CLIENT_KEY],
                        finetune_steps=2, finetune_seconds=60)
    with threaded_server(settings, tiny_backbone) as url:
        yield url


@pytest.fixture(scope="module")
def registered(server, tmp_path_factory):
    """One product registered from four shots, each given as a different kind of input."""
    path = tmp_path_factory.mktemp("shots") / "shot0.png"
    path.write_bytes(png(good(0)))
    inputs = [path, png(good(1)), good(2), np.asarray(good(3))]  # path, bytes, PIL, numpy
    with Client(server, ADMIN_KEY) as admin:
        result = admin.register("widget", inputs, description="metal widget", finetune=True)
        updates: list[Job] = []
        job = admin.wait_job(result.job_id, timeout=120, poll_s=0.1, progress=updates.append)
    return result, job, updates


def test_register_with_every_input_kind_and_wait_for_the_job(server, registered):
    result, job, updates = registered
    assert isinstance(result, ShotsRegistered)
    assert (result.category, result.version, result.shots, result.added) == ("widget", 1, 4, 4)
    assert job.state is JobState.succeeded and job.progress == 1.0 and job.result_version == 2
    progress = [u.progress for u in updates]
    assert progress == sorted(progress) and updates[-1].state is JobState.succeeded  # the callback saw it finish
    with Client(server, CLIENT_KEY) as client:
        assert client.health() and client.ready().status == "ready"
        assert [c.category for c in client.categories()] == ["widget"]
        info = client.category("widget")
        assert [v.version for v in info.versions] == [1, 2] and info.shots == 4


def test_predict_returns_typed_results_and_decodable_heatmaps(server, registered):
    with Client(server, CLIENT_KEY) as client:
        r = client.predict("widget", [good(20, size=(80, 60)), np.asarray(defect(21))], heatmap="png")
        assert isinstance(r, PredictResponse) and len(r.predictions) == 2
        first = r.predictions[0]
        assert first.filename == "image-0.png" and first.adapter_version == r.adapter_version
        assert heatmap_image(first).size == (80, 60)  # the overlay comes back at the upload's size
        raw = client.predict("widget", good(20, size=(80, 60)), heatmap="raw").predictions[0]
        grid = heatmap_grid(raw)
        assert grid.ndim == 2 and grid.dtype == np.float32
        assert raw.score == pytest.approx(first.score, abs=1e-4)  # same bytes, same adapter, same score
        mask = anomaly_mask(raw, size=(80, 60))
        assert mask.shape == (60, 80) and mask.dtype == bool
        with pytest.raises(ValueError, match="heatmap='raw'"):
            heatmap_grid(first)


def test_wait_job_draws_a_progress_bar(server, registered, capsys):
    _, job, _ = registered
    with Client(server, ADMIN_KEY) as admin:
        assert admin.wait_job(job.id, progress=True).state is JobState.succeeded
    err = capsys.readouterr().err
    assert f"job {job.id[:8]}" in err and "100%" in err and "succeeded" in err


def test_errors_carry_the_service_code_and_request_id(server, registered):
    with Client(server, "wrong-key") as client, pytest.raises(ClipshotError) as info:
        client.categories()
    assert info.value.status == 401 and info.value.code == "invalid_key" and info.value.request_id
    with Client(server, CLIENT_KEY) as client:
        with pytest.raises(ClipshotError) as info:
            client.register("other", [good(0)])
        assert info.value.status == 403  # a client (line) key may not register
        with pytest.raises(ClipshotError) as info:
            client.predict("nope", good(0))
        assert info.value.status == 404
    with Client(f"http://127.0.0.1:{free_port()}", CLIENT_KEY) as client, pytest.raises(ClipshotError) as info:
        client.health()
    assert info.value.status == 0 and info.value.code == "unreachable"


def test_encode_image_rejects_what_it_cannot_send():
    name, data = encode_image(np.zeros((4, 5), dtype=np.float32))
    assert name.endswith(".png") and data.startswith(b"\x89PNG")
    with pytest.raises(TypeError, match="cannot send dict"):
        encode_image({})  # type: ignore[arg-type]


def test_decision_routes(server, registered):
    """Threshold, feedback and shots through the client."""
    with Client(server, ADMIN_KEY) as admin:
        changed = admin.set_threshold("widget", threshold=0.75)
        assert changed.decision.threshold == pytest.approx(0.75) and changed.decision.policy == "manual"
        assert admin.category("widget").decision.threshold == pytest.approx(0.75)
        assert admin.set_threshold("widget", auto=True).decision.policy == "auto"
        with pytest.raises(ValueError, match="exactly one"):
            admin.set_threshold("widget", threshold=0.5, auto=True)
        fed = admin.feedback("widget", [defect(30)], "defect")
        assert fed.added == 1 and fed.version > changed.version
        assert any(s.source == "registration" for s in admin.shots("widget"))


def test_the_client_imports_no_model_code():
    """A line PC may use the client without the model stack: importing it must not pull in torch."""
    import subprocess
    import sys

    code = "import sys, app.client; print('torch' in sys.modules, 'clipshot' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
