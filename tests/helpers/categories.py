"""Shared by the test modules (first written for tests/test_app_categories.py)."""

from __future__ import annotations

import hashlib
import io
import time
from pathlib import Path

import numpy as np
from fastapi.testclient import TestClient
from PIL import Image

from app.core.config import Settings

ADMIN = {"Authorization": "Bearer admin-key"}
CLIENT = {"Authorization": "Bearer client-key"}


def image_bytes(seed: int, fmt: str = "PNG", size: int = 64) -> bytes:
    """A 'good part': the same smooth texture plus a little noise, encoded as a real PNG/JPEG."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = np.stack([0.5 + 0.25 * np.sin(2 * np.pi * (3 * xx + 2 * yy)),
                     0.5 + 0.25 * np.cos(2 * np.pi * (2 * xx - 3 * yy)),
                     0.5 + 0.2 * np.sin(2 * np.pi * 4 * xx)], axis=-1)
    pixels = (np.clip(base + rng.normal(0, 0.03, base.shape), 0, 1) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt)
    return buf.getvalue()


def shots(seeds: range | list[int], fmt: str = "PNG") -> list[tuple[str, tuple[str, bytes, str]]]:
    ext = "png" if fmt == "PNG" else "jpg"
    return [("files", (f"good{s}.{ext}", image_bytes(s, fmt), f"image/{ext}")) for s in seeds]


def snapshot(root: Path) -> dict[str, str]:
    """Every file under the store with its content hash (the job and record databases only by name)."""
    return {str(p.relative_to(root)): "db" if p.name.startswith(("jobs.sqlite3", "records.sqlite3")) else
            hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def wait_job(client: TestClient, job_id: str, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}", headers=ADMIN).json()
        if job["state"] not in ("queued", "running"):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not finish within {timeout}s: {job}")


def make_settings(store: Path, **overrides) -> Settings:
    values = dict(backbone="test:tiny-clip", device="cpu", store=store, admin_keys=["admin-key"],
                  client_keys=["client-key"], finetune_steps=2, finetune_seconds=60)
    return Settings(_env_file=None, **{**values, **overrides})
