"""The torch-free client distribution (clients/python): its dependencies, its models against the service's
OpenAPI schema, its retries on 503 + Retry-After, and its answers against a real loopback service."""

from __future__ import annotations

import http.server
import subprocess
import sys
import threading
import time
import tomllib

import httpx
import pytest
from threaded_server import threaded_server

from app.api.client_models import render_client_models
from app.client import Client as ServiceClient
from app.core.config import Settings
from tests.conftest import REPO
from tests.helpers.predict import good, png

CLIENT_DIR = REPO / "clients" / "python"
sys.path.insert(0, str(CLIENT_DIR))

from clipshot_client import Client, ClipshotError, PredictResponse, retry_after_s  # noqa: E402

ADMIN_KEY, CLIENT_KEY = "admin-key", "client-key"


def test_the_models_are_the_services_schema():
    committed = (CLIENT_DIR / "clipshot_client" / "models.py").read_text()
    assert committed == render_client_models(), (
        "clients/python/clipshot_client/models.py drifted from the service's OpenAPI schema: regenerate it with "
        "python -m app.api.client_models > clients/python/clipshot_client/models.py")


def test_installing_and_importing_the_client_pulls_in_no_model_code():
    project = tomllib.loads((CLIENT_DIR / "pyproject.toml").read_text())["project"]
    assert {dep.split(">")[0].split("=")[0].strip() for dep in project["dependencies"]} == {"httpx", "pydantic"}
    heavy = ("torch", "numpy", "PIL", "open_clip", "fastapi", "app", "clipshot")
    code = (f"import sys, clipshot_client; print([m for m in {heavy!r} if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={"PYTHONPATH": str(CLIENT_DIR), "PATH": "/usr/bin:/bin"}, cwd=CLIENT_DIR)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


class _Busy(http.server.BaseHTTPRequestHandler):
    """Answers 503 + Retry-After for the first ``busy`` requests, then 200: a service that was full for a while."""

    busy, retry_after, seen = 2, "1", []

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        type(self).seen.append(time.monotonic())
        full = len(type(self).seen) <= type(self).busy
        body = (b'{"error": {"code": "overloaded", "message": "busy", "request_id": "r"}}' if full
                else b'{"status": "ok"}')
        self.send_response(503 if full else 200)
        if full:
            self.send_header("Retry-After", type(self).retry_after)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture()
def busy_server():
    _Busy.seen = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Busy)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_503_is_retried_after_the_retry_after_the_service_sent(busy_server):
    with Client(busy_server, retries=3) as client:
        assert client.health()
    waits = [b - a for a, b in zip(_Busy.seen, _Busy.seen[1:], strict=False)]
    assert len(_Busy.seen) == 3
    assert all(w >= 0.95 for w in waits), waits  # Retry-After: 1 each time (0.05 s slack for the clock)


def test_a_service_still_busy_after_the_retries_is_an_error(busy_server):
    _Busy.busy = 10
    try:
        with Client(busy_server, retries=1, max_retry_wait_s=0.1) as client, pytest.raises(ClipshotError) as caught:
            client.health()
    finally:
        _Busy.busy = 2
    assert caught.value.status == 503 and caught.value.code == "overloaded" and len(_Busy.seen) == 2


def test_retry_after_as_an_http_date():
    later = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    response = httpx.Response(503, headers={"Retry-After": later})
    assert 25 <= retry_after_s(response, 0) <= 31


def test_answers_against_the_real_service_match_the_service_client(tmp_path, tiny_backbone):
    settings = Settings(_env_file=None, backbone="test:tiny-clip", device="cpu", store=tmp_path,
                        admin_keys=[ADMIN_KEY], client_keys=[CLIENT_KEY])
    image = tmp_path / "part.png"
    image.write_bytes(png(good(80)))
    with threaded_server(settings, tiny_backbone) as url:
        with ServiceClient(url, ADMIN_KEY) as admin:
            admin.register("widget", [good(s) for s in range(4)], finetune=False)
            reference = admin.predict("widget", [image], heatmap="regions")
        with Client(url, CLIENT_KEY) as client:
            answer = client.predict("widget", [image], heatmap="regions", part_id="P-1")
            assert [c.category for c in client.categories()] == ["widget"]
            assert client.category("widget").active_version == 1
            with pytest.raises(ClipshotError) as missing:
                client.predict("nope", [image])
        raw = httpx.post(f"{url}/v1/categories/widget/predict?heatmap=regions",
                         headers={"Authorization": f"Bearer {CLIENT_KEY}"},
                         files=[("files", ("part.png", image.read_bytes()))]).json()
    assert isinstance(answer, PredictResponse)
    assert PredictResponse.model_validate(raw).model_dump(mode="json") == raw  # every field, nothing lost
    got, want = answer.predictions[0], reference.predictions[0]
    assert got.score == want.score and got.sha256 == want.sha256 and got.regions is not None
    assert missing.value.status == 404 and missing.value.request_id
