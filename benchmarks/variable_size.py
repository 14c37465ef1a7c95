"""Derive a variable-size copy of MVTec-layout datasets: the geometry rule's probe for products whose photos
differ in size and aspect (an ROI cut per part, crops of a web, tiles of several formats).

Every image becomes one random crop of itself — width and height each a uniform fraction in [``--smallest``, 1]
of the original, at the original scale — and its mask is cut alike; a defect image's crop always keeps the
centre of its mask, so the label stays true. The crop rule is seeded, so a derivation is repeatable. The derived
images are written under ``--out`` (outside the repository: the sources' licences allow results, not copies, in
it) and read by the accuracy suite like any dataset:

    python benchmarks/variable_size.py --data ../shared/data --out /tmp/varsize
    python benchmarks/accuracy_suite.py --data /tmp/varsize --out /tmp/vs-auto --shots 4 --seeds 0 1 2
    python benchmarks/accuracy_suite.py --data /tmp/varsize --out /tmp/vs-squash --shots 4 --seeds 0 1 2 \\
        --resize squash

Results: docs/results/geometry-screen/.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import numpy as np
from PIL import Image

from clipshot.evaluation.dataset import IMAGE_SUFFIXES


def crop_box(size: tuple[int, int], smallest: float, rng: random.Random,
             keep: tuple[int, int] | None = None) -> tuple[int, int, int, int]:
    """A random (left, top, right, bottom) box of ``size`` = (width, height), sides in [smallest, 1] of it,
    containing the pixel ``keep`` = (x, y) when given."""
    width, height = size
    w = max(1, int(width * rng.uniform(smallest, 1)))
    h = max(1, int(height * rng.uniform(smallest, 1)))
    if keep is None:
        x0, y0 = rng.randint(0, width - w), rng.randint(0, height - h)
    else:
        x, y = keep
        x0 = rng.randint(max(0, x - w + 1), min(x, width - w))
        y0 = rng.randint(max(0, y - h + 1), min(y, height - h))
    return x0, y0, x0 + w, y0 + h


def derive(category: Path, out: Path, smallest: float, seed: int) -> int:
    """Write the cropped copy of one MVTec-layout ``category`` folder; returns how many images it wrote."""
    rng = random.Random(seed)
    written = 0
    for path in sorted(p for p in category.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        rel = path.relative_to(category)
        if rel.parts[0] == "ground_truth":
            continue
        image = Image.open(path)
        masks = []
        if rel.parts[0] == "test" and rel.parts[1] != "good":
            masks = sorted((category / "ground_truth" / rel.parts[1]).glob(path.stem + "*"))
        mask = Image.open(masks[0]) if masks else None
        keep = None
        if mask is not None:
            ys, xs = np.nonzero(np.asarray(mask.convert("L")) > 0)
            keep = (int(xs.mean()), int(ys.mean())) if xs.size else None
        box = crop_box(image.size, smallest, rng, keep)
        target = (out / rel).with_suffix(".png")
        target.parent.mkdir(parents=True, exist_ok=True)
        image.crop(box).save(target)
        written += 1
        if mask is not None:
            mask_target = (out / "ground_truth" / rel.parts[1] / masks[0].name).with_suffix(".png")
            mask_target.parent.mkdir(parents=True, exist_ok=True)
            mask.crop(box).save(mask_target)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="folder holding MVTec-layout datasets")
    parser.add_argument("--out", type=Path, required=True, help="where the derived copy goes (outside the repo)")
    parser.add_argument("--smallest", type=float, default=0.5, help="smallest crop side, as a fraction of the image's")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not 0 < args.smallest <= 1:
        parser.error("--smallest must be in (0, 1]")
    categories = sorted(p.parent for p in args.data.rglob("train")
                        if (p / "good").is_dir() and (p.parent / "test").is_dir())
    if not categories:
        raise SystemExit(f"no MVTec-layout dataset under {args.data}")
    for category in categories:
        count = derive(category, args.out / category.relative_to(args.data), args.smallest, args.seed)
        print(f"{category.relative_to(args.data)}: {count} images")


if __name__ == "__main__":
    main()
