"""Logs and environment checks of `clipshot serve`: request ids on every request line (uvicorn's included),
JSON lines on demand, the no-auth warning once, misspelt CLIPSHOT_* variables flagged."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import httpx

from app.core.env import unknown_env_warnings
from tests.conftest import REPO
from tests.helpers.processes import STARTUP_TIMEOUT_S, free_port, serve_command


def test_unknown_variables_are_named_with_a_guess(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("CLIPSHOT_MAX_SHOT=4\nCLIPSHOT_PORT=8001\nOTHER=1\n")
    warnings = unknown_env_warnings({"CLIPSHOT_ADMIN_KEY": "k", "CLIPSHOT_STORE": "s", "PATH": "/bin"}, env_file)
    assert len(warnings) == 2, warnings  # the real settings and other programs' variables are not flagged
    assert "CLIPSHOT_ADMIN_KEY (from environment)" in warnings[0] and "did you mean CLIPSHOT_ADMIN_KEYS?" in warnings[0]
    assert "CLIPSHOT_MAX_SHOT (from" in warnings[1] and "did you mean CLIPSHOT_MAX_SHOTS?" in warnings[1]


def test_serve_logs_json_lines_with_request_ids(tmp_path):
    port = free_port()
    env = {**os.environ, "CLIPSHOT_BACKBONE": "test:tiny-clip", "CLIPSHOT_DEVICE": "cpu",
           "CLIPSHOT_STORE": str(tmp_path / "store"), "CLIPSHOT_INSECURE_DEV": "true", "CLIPSHOT_ADMIN_KEYS": "",
           "CLIPSHOT_CLIENT_KEYS": "", "CLIPSHOT_LOG_FORMAT": "json", "CLIPSHOT_BATCH_SIZE": "8",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    log_path = tmp_path / "serve.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen([*serve_command(), "--port", str(port), "--log-level", "info"], env=env,
                                cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=20) as client:
                deadline = time.monotonic() + STARTUP_TIMEOUT_S
                while True:
                    assert proc.poll() is None, log_path.read_text()
                    try:
                        if client.get("/readyz", timeout=1).status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    assert time.monotonic() < deadline, "server did not come up in time"
                    time.sleep(0.25)
                assert client.get("/v1/categories/nope", headers={"X-Request-ID": "line7-part42"}).status_code == 404
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=30)
    text = log_path.read_text()
    records = [json.loads(line) for line in text.splitlines() if line.strip()]  # every line is one JSON object
    assert all({"time", "level", "logger", "message", "request_id"} <= set(r) for r in records)
    access = [r for r in records if r["logger"] == "uvicorn.access" and "/v1/categories/nope" in r["message"]]
    assert len(access) == 1 and access[0]["request_id"] == "line7-part42", text
    no_auth = [r for r in records if "WITHOUT authentication" in r["message"]]
    assert len(no_auth) == 1, text  # was printed twice (CLI check + app lifespan)
    unknown = [r for r in records if "CLIPSHOT_BATCH_SIZE" in r["message"]]
    assert len(unknown) == 1 and "did you mean CLIPSHOT_MAX_BATCH_SIZE?" in unknown[0]["message"]

