"""`clipshot serve` as a real process on a loopback port, plus the CLI's startup-failure messages."""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import time
import warnings

import httpx
import pytest

from app.cli.main import main
from model_store import AdapterStore
from model_store.adapters import save_adapter
from tests.conftest import REPO
from tests.helpers.predict import good, png
from tests.helpers.processes import STARTUP_TIMEOUT_S, free_port, serve_command

LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d [\d:,]+ (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")
KEY = "subprocess-client-key"


def test_serve_answers_real_http_requests_and_stops_cleanly(tmp_path, tiny_detector):
    store = tmp_path / "store"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapter = tiny_detector.fit_memory([good(s) for s in range(4)], category="widget", text=False,
                                           calibration_views=0)
    save_adapter(AdapterStore(store), tiny_detector, adapter)
    port = free_port()
    env = {**os.environ, "CLIPSHOT_BACKBONE": "test:tiny-clip", "CLIPSHOT_DEVICE": "cpu",
           "CLIPSHOT_STORE": str(store), "CLIPSHOT_CLIENT_KEYS": KEY, "CLIPSHOT_ADMIN_KEYS": "",
           "CLIPSHOT_HOST": "0.0.0.0", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    log = (tmp_path / "serve.log").open("w+")
    proc = subprocess.Popen([*serve_command(), "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
                            env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base, timeout=20) as client:
            deadline = time.monotonic() + STARTUP_TIMEOUT_S
            while True:
                assert proc.poll() is None, f"server exited early:\n{(tmp_path / 'serve.log').read_text()}"
                try:
                    if client.get("/healthz", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "server did not come up in time"
                time.sleep(0.25)
            assert client.get("/readyz").status_code == 200
            upload = [("files", ("part.png", png(good()), "image/png"))]
            r = client.post("/v1/categories/widget/predict", files=upload, headers={"Authorization": f"Bearer {KEY}"})
            assert r.status_code == 200, r.text
            assert r.json()["predictions"][0]["adapter_version"] == 1
            assert client.post("/v1/categories/widget/predict", files=upload).status_code == 401
            assert "clipshot_http_request_duration_seconds" in client.get("/metrics").text
            # "serve --log-level warning still prints INFO" must not come back: uvicorn's lines obey the flag too
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
            pytest.fail("server did not stop within 30 s of SIGINT")
        log.close()
    output = (tmp_path / "serve.log").read_text()
    assert code == 0, output
    assert " INFO " not in output and "Loaded pretrained" not in output, output


@pytest.mark.parametrize(("env", "expected_code", "must_mention"), [
    ({"CLIPSHOT_BACKBONE": "open_clip:ViT-B-16:/nonexistent/clip.safetensors", "CLIPSHOT_INSECURE_DEV": "true"},
     1, ["CLIPSHOT_BACKBONE=open_clip:<arch>:/path/to/", "imagenet:efficientnet-lite0"]),
    ({"CLIPSHOT_INSECURE_DEV": "false"}, 2, ["CLIPSHOT_ADMIN_KEYS", "CLIPSHOT_INSECURE_DEV"]),
    ({"CLIPSHOT_MAX_BATCH_SIZE": "0", "CLIPSHOT_INSECURE_DEV": "true"}, 2, ["CLIPSHOT_MAX_BATCH_SIZE='0'"]),
    ({"CLIPSHOT_MIN_SHOTS": "8", "CLIPSHOT_INSECURE_DEV": "true"}, 2, ["CLIPSHOT_MIN_SHOTS", "CLIPSHOT_MAX_SHOTS"]),
    ({"CLIPSHOT_HOST": "", "CLIPSHOT_INSECURE_DEV": "true"}, 2, ["CLIPSHOT_HOST (or --host)=''"]),
])
def test_serve_startup_failures_are_one_message_and_nonzero_exit(monkeypatch, tmp_path, env, expected_code,
                                                               must_mention):
    monkeypatch.chdir(tmp_path)  # no stray .env
    for name in ("CLIPSHOT_ADMIN_KEYS", "CLIPSHOT_CLIENT_KEYS", "CLIPSHOT_BACKBONE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("CLIPSHOT_STORE", str(tmp_path / "store"))
    stderr = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    assert main(["serve", "--port", str(free_port())]) == expected_code
    output = stderr.getvalue()
    assert "Traceback" not in output
    errors = [line for line in output.splitlines() if not LOG_LINE.match(line)]
    assert len(errors) == 1, output  # one line, whatever pydantic or the loader said; the rest are log records
    message = errors[0]
    assert message.startswith("clipshot serve: ")
    for text in must_mention:
        assert text in message
