"""A real server on loopback with the inspection record on, for tests/test_app_records*.py and test_app_audit.py."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
import pytest

from app.core.config import Settings
from app.main import create_app
from tests.helpers.predict import good, png

ADMIN = {"Authorization": "Bearer admin-key"}
CLIENT = {"Authorization": "Bearer client-key"}
DRAIN_S = 30  # the writer handles a few rows in milliseconds; 30 s only matters on a starved CI box


@dataclass
class Recording:
    """The server's URL, its app (to reach the writer) and an HTTP client."""

    url: str
    app: object
    http: httpx.Client

    @property
    def records(self):
        return self.app.state.records

    def drain(self) -> None:
        """Wait until every queued inspection is written (the writer is asynchronous on purpose)."""
        assert self.records.writer.drain(DRAIN_S), "the record writer did not catch up"

    def predict(self, seeds, *, data=None, headers=None, category="widget", size=None) -> httpx.Response:
        files = [("files", (f"img{s}.png", png(good(s, size)), "image/png")) for s in seeds]
        response = self.http.post(f"/v1/categories/{category}/predict", files=files, data=data or {},
                                  headers={**CLIENT, **(headers or {})})
        assert response.status_code == 200, response.text
        return response

    def inspections(self, category="widget", headers=CLIENT, **params) -> httpx.Response:
        return self.http.get(f"/v1/categories/{category}/inspections", params=params, headers=headers)


def backend_url(request: pytest.FixtureRequest, backend: str) -> str | None:
    """None for the embedded SQLite record, else a fresh PostgreSQL schema (``postgres_url``: fails in CI if absent)."""
    return request.getfixturevalue("postgres_url") if backend == "postgresql" else None


@contextmanager
def recording(store, backbone, *, job_db: str | None = None, register: bool = True, admin_keys=("admin-key",),
              **overrides) -> Iterator[Recording]:
    """Serve a store with ``record_mode`` (default ``verdicts``) and, unless told not to, a registered ``widget``."""
    from tests.threaded_server import threaded_server

    overrides.setdefault("record_mode", "verdicts")
    settings = Settings(_env_file=None, backbone="test:tiny-clip", device="cpu", store=store, job_db=job_db,
                        admin_keys=admin_keys if isinstance(admin_keys, str) else list(admin_keys),
                        client_keys=["client-key"], max_batch_wait_ms=2, **overrides)
    app = create_app(settings, backbone=backbone)
    with threaded_server(settings, app=app) as url, httpx.Client(base_url=url, timeout=60) as http:
        live = Recording(url, app, http)
        if register:
            shots = [("files", (f"s{s}.png", png(good(s)), "image/png")) for s in range(4)]
            response = http.post("/v1/categories/widget/shots", files=shots, data={"finetune": "false"},
                                 headers=ADMIN)
            assert response.status_code == 201, response.text
        yield live
