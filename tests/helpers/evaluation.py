"""Shared by the test modules (first written for tests/test_eval_protocol.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

SIDE = 32


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def make_dataset(root: Path, category: str = "widget", n_train: int = 6, n_good: int = 3,
                 n_defect: int = 3, seed: int = 0) -> Path:
    """MVTec layout with textured grey 32x32 images; defects are bright squares with masks."""
    rng = np.random.default_rng(seed)

    def normal() -> np.ndarray:
        return (120 + rng.integers(0, 16, (SIDE, SIDE, 3))).astype(np.uint8)

    cat = root / category
    for i in range(n_train):
        _png(cat / "train" / "good" / f"{i:03d}.png", normal())
    for i in range(n_good):
        _png(cat / "test" / "good" / f"{i:03d}.png", normal())
    for i in range(n_defect):
        img, mask = normal(), np.zeros((SIDE, SIDE), dtype=np.uint8)
        r, c = 4 + 6 * i, 20 - 5 * i
        img[r:r + 5, c:c + 6] = 250
        mask[r:r + 5, c:c + 6] = 255
        _png(cat / "test" / "scratch" / f"{i:03d}.png", img)
        _png(cat / "ground_truth" / "scratch" / f"{i:03d}_mask.png", mask)
    return root
