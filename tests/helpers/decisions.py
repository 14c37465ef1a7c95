"""Shared by the test modules (first written for tests/test_app_decisions.py)."""

from __future__ import annotations

import json
from pathlib import Path

from fastapi.testclient import TestClient

from tests.helpers.categories import ADMIN, shots


def manifest(store: Path, category: str, version: int) -> dict:
    return json.loads((store / "categories" / category / f"v{version}" / "manifest.json").read_text())


def register(client: TestClient, seeds=range(4), category: str = "widget") -> dict:
    r = client.post(f"/v1/categories/{category}/shots", headers=ADMIN, files=shots(seeds), data={"finetune": "false"})
    assert r.status_code == 201, r.text
    return r.json()
