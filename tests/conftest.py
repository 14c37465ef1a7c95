"""Shared fixtures: one tiny random CLIP per session (building it is the slow part of most tests)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
pytest_plugins = ["pg_fixtures"]  # PostgreSQL server / per-test schema fixtures

REPO = Path(__file__).resolve().parent.parent
BOTTLE = REPO.parent / "shared" / "data" / "mvtec_ad" / "bottle"


@pytest.fixture(scope="module")
def single_thread():
    """Training tests run one torch thread: on a shared 2-core box two threads were ~70x slower (contention)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_backbone():
    from clipshot.backbone import load_backbone

    return load_backbone("test:tiny-clip")


@pytest.fixture(scope="session")
def tiny_detector(tiny_backbone):
    from clipshot.detector import Detector

    return Detector(tiny_backbone)


def textured(seed: int, size: int = 64, jitter: float = 0.03) -> np.ndarray:
    """A smooth periodic texture: every 'good part' is the same pattern plus a little sensor noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = np.stack([
        0.5 + 0.25 * np.sin(2 * np.pi * (3 * xx + 2 * yy)),
        0.5 + 0.25 * np.cos(2 * np.pi * (2 * xx - 3 * yy)),
        0.5 + 0.2 * np.sin(2 * np.pi * 4 * xx) * np.cos(2 * np.pi * 4 * yy),
    ], axis=-1)
    noisy = base + rng.normal(0, jitter, base.shape)
    return (np.clip(noisy, 0, 1) * 255).astype(np.uint8)


@pytest.fixture()
def good_images() -> list[Image.Image]:
    return [Image.fromarray(textured(seed)) for seed in range(5)]


@pytest.fixture(autouse=True)
def _restore_root_logger():
    """In-process CLI calls configure the root logger as a process would; undo it so tests stay independent."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
