"""``benchmarks/variable_size.py``: the derived copies the geometry screen (docs/results/geometry-screen/) rests on
must keep every label true — a defect image's crop keeps its defect, its mask is cut exactly like it — and vary
sizes within the asked range, repeatably."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
from PIL import Image

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "variable_size.py"


def _module():
    spec = importlib.util.spec_from_file_location("variable_size", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["variable_size"] = module
    spec.loader.exec_module(module)
    return module


def _category(root: Path) -> Path:
    """A 120 x 80 MVTec-layout category: 3 good shots, 2 good tests, 4 defects with a small square each."""
    category = root / "part"
    rng = np.random.default_rng(0)
    for folder, count in (("train/good", 3), ("test/good", 2), ("test/dent", 4)):
        (category / folder).mkdir(parents=True)
        for i in range(count):
            pixels = rng.integers(0, 255, (80, 120, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(category / folder / f"{i:03d}.png")
    (category / "ground_truth" / "dent").mkdir(parents=True)
    for i in range(4):
        mask = np.zeros((80, 120), dtype=np.uint8)
        mask[10 + 15 * i : 16 + 15 * i, 100 - 20 * i : 106 - 20 * i] = 255  # a defect near a different edge each
        Image.fromarray(mask).save(category / "ground_truth" / "dent" / f"{i:03d}_mask.png")
    return category


def test_crops_keep_every_defect_and_cut_its_mask_alike(tmp_path):
    variable = _module()
    source = _category(tmp_path / "src")
    out = tmp_path / "out" / "part"
    assert variable.derive(source, out, 0.5, seed=0) == 9
    sizes = set()
    for image in sorted(out.rglob("*.png")):
        if "ground_truth" in image.parts:
            continue
        width, height = Image.open(image).size
        sizes.add((width, height))
        assert 60 <= width <= 120 and 40 <= height <= 80  # each side within [0.5, 1] of the original
    assert len(sizes) > 5  # sizes really vary
    for i in range(4):
        image = Image.open(out / "test" / "dent" / f"{i:03d}.png")
        mask = Image.open(out / "ground_truth" / "dent" / f"{i:03d}_mask.png")
        assert mask.size == image.size
        assert (np.asarray(mask) > 0).any()  # the defect is still in the picture
    again = tmp_path / "again" / "part"
    variable.derive(source, again, 0.5, seed=0)
    first = np.asarray(Image.open(out / "test" / "dent" / "002.png"))
    assert np.array_equal(first, np.asarray(Image.open(again / "test" / "dent" / "002.png")))  # repeatable


def test_crop_box_contains_the_kept_pixel():
    variable = _module()
    import random

    rng = random.Random(1)
    for _ in range(200):
        keep = (rng.randrange(300), rng.randrange(100))
        left, top, right, bottom = variable.crop_box((300, 100), 0.5, rng, keep)
        assert 0 <= left <= keep[0] < right <= 300 and 0 <= top <= keep[1] < bottom <= 100
        assert right - left >= 150 and bottom - top >= 50
