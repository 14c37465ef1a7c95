"""Shared by the test modules (first written for tests/test_app_serving.py)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import asynccontextmanager, contextmanager

import httpx
from prometheus_client.parser import text_string_to_metric_families

from app.core.config import Settings
from tests.helpers.predict import KEYS, good


def fit(detector, category: str, seeds=range(4)):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return detector.fit_memory([good(s) for s in seeds], category=category, text=False, calibration_views=0)


def settings_for(root, **overrides) -> Settings:
    return Settings(backbone="test:tiny-clip", device="cpu", store=root, **KEYS, **overrides)


@asynccontextmanager
async def serving(app):
    """Run the lifespan by hand and talk to the app over real HTTP semantics (httpx + ASGI)."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://clipshot", timeout=30) as client:
            yield client


def total(text: str, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels`` (parsed with prometheus_client)."""
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == name and labels.items() <= sample.labels.items())


@contextmanager
def served_widget(store, backbone, admin_key: str, client_key: str) -> Iterator[str]:
    """A real server on loopback whose store holds `widget`, registered from four good shots (memory adapter only,
    no fine-tune); yields its URL. Shared by the command-line tests that talk to a running service."""
    from app.client import Client
    from tests.threaded_server import threaded_server

    settings = Settings(_env_file=None, backbone="test:tiny-clip", device="cpu", store=store,
                        admin_keys=[admin_key], client_keys=[client_key])
    with threaded_server(settings, backbone) as url:
        with Client(url, admin_key) as admin:
            admin.register("widget", [good(s) for s in range(4)], finetune=False)
        yield url
