"""``clipshot samples``: photos of a made-up product to try the service on, written in seconds, no download.

A newcomer's first question is "does it work on *something*?", before they have photographed their own parts.
The samples are a machined washer on a dark table: good parts vary as parts on a line do (position, rotation of
the machining marks, light), and each defect photo carries one defect of a kind plants report (a scratch, a dent,
a chipped edge, a stain) with its ground-truth mask. Everything is drawn with Pillow and numpy from a seed, so
the same command gives the same files everywhere.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SIZE = 256  # px, square: small enough to register in seconds on a CPU, large enough for a visible defect
DEFECTS = ("scratch", "dent", "chip", "stain")


def register(subparsers: Any, name: str, help_text: str) -> argparse.ArgumentParser:
    """Register ``samples`` on the console script's subparsers."""
    parser = subparsers.add_parser(
        name, help=help_text,
        description="Write photos of a made-up product (a machined washer) to try the service on: good/ (to "
                    "register and to test), defect/ with one defect each, and defect_masks/ with where it is.")
    parser.add_argument("out", type=Path, help="folder to write into (created; existing sample files are replaced)")
    parser.add_argument("--good", type=int, default=12, help="good parts to write (default 12: register 4-8, "
                                                              "keep the rest to see that good parts pass)")
    parser.add_argument("--defects", type=int, default=8, help="defect photos, the kinds in turn (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="another seed draws other parts (default 0)")
    parser.set_defaults(func=samples)
    return parser


def samples(args: argparse.Namespace) -> int:
    """Write the files and print what to do with them."""
    written = write_samples(args.out, good=args.good, defects=args.defects, seed=args.seed)
    print(f"wrote {len(written['good'])} good and {len(written['defect'])} defect photos to {args.out}")
    print("try:  curl " + " ".join(f"-F files=@{p}" for p in written["good"][:4])
          + " http://127.0.0.1:8000/v1/categories/washer/shots")
    print(f"      curl -F files=@{written['defect'][0]} http://127.0.0.1:8000/v1/categories/washer/predict")
    return 0


def write_samples(out: Path, *, good: int = 12, defects: int = 8, seed: int = 0) -> dict[str, list[Path]]:
    """Write ``good`` good photos and ``defects`` defect photos (+ masks and a manifest) under ``out``."""
    if good < 1 or defects < 0:
        raise ValueError("--good must be at least 1 and --defects at least 0")
    folders = {name: out / name for name in ("good", "defect", "defect_masks")}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    written: dict[str, list[Path]] = {"good": [], "defect": []}
    manifest = []
    for i in range(good):
        path = folders["good"] / f"good_{i:03d}.png"
        good_part(rng).save(path)
        written["good"].append(path)
    for i in range(defects):
        kind = DEFECTS[i % len(DEFECTS)]
        image, mask = defect_part(rng, kind)
        path = folders["defect"] / f"{kind}_{i:03d}.png"
        image.save(path)
        mask.save(folders["defect_masks"] / path.name)
        written["defect"].append(path)
        manifest.append({"file": path.name, "defect": kind})
    (out / "samples.json").write_text(json.dumps({"seed": seed, "defects": manifest}, indent=1) + "\n")
    return written


def good_part(rng: np.random.Generator) -> Image.Image:
    """One good washer: centre, machining-mark angle and light drawn from ``rng``."""
    return _draw(rng)[0]


def defect_part(rng: np.random.Generator, kind: str) -> tuple[Image.Image, Image.Image]:
    """(photo, mask) of a washer with one defect of ``kind`` (``DEFECTS``) on its face."""
    if kind not in DEFECTS:
        raise ValueError(f"defect kind must be one of {DEFECTS}, got {kind!r}")
    image, (cx, cy, outer, inner) = _draw(rng)
    mask = Image.new("L", image.size, 0)
    paint, marks = ImageDraw.Draw(image), ImageDraw.Draw(mask)
    angle = rng.uniform(0, 2 * math.pi)
    radius = rng.uniform(inner + 12, outer - 12)
    x, y = cx + radius * math.cos(angle), cy + radius * math.sin(angle)
    if kind == "scratch":
        length, turn = rng.uniform(25, 45), angle + math.pi / 2 + rng.uniform(-0.4, 0.4)
        dx, dy = length / 2 * math.cos(turn), length / 2 * math.sin(turn)
        for layer, fill, width in ((paint, (58, 58, 62), 2), (marks, 255, 4)):
            layer.line([(x - dx, y - dy), (x + dx, y + dy)], fill=fill, width=width)
    elif kind == "dent":
        r = rng.uniform(5, 8)
        paint.ellipse([x - r - 1, y - r - 1, x + r + 1, y + r + 1], fill=(215, 215, 220))
        paint.ellipse([x - r, y - r, x + r, y + r], fill=(75, 73, 72))
        marks.ellipse([x - r - 2, y - r - 2, x + r + 2, y + r + 2], fill=255)
    elif kind == "chip":
        edge_x, edge_y, r = cx + outer * math.cos(angle), cy + outer * math.sin(angle), rng.uniform(9, 13)
        paint.ellipse([edge_x - r, edge_y - r, edge_x + r, edge_y + r], fill=(34, 34, 38))
        marks.ellipse([edge_x - r, edge_y - r, edge_x + r, edge_y + r], fill=255)
        face = Image.new("L", image.size, 0)  # the defect is the face that is missing, not the table around it
        ImageDraw.Draw(face).ellipse([cx - outer, cy - outer, cx + outer, cy + outer], fill=255)
        mask = Image.fromarray(np.minimum(np.asarray(mask), np.asarray(face)))
    else:  # stain: a soft brown blot
        r = rng.uniform(10, 15)
        blot = Image.new("L", image.size, 0)
        ImageDraw.Draw(blot).ellipse([x - r, y - r * 0.7, x + r, y + r * 0.7], fill=150)
        blot = blot.filter(ImageFilter.GaussianBlur(3))
        image = Image.composite(Image.new("RGB", image.size, (120, 84, 45)), image, blot)
        mask = blot.point(lambda v: 255 if v > 40 else 0)
    return image, mask


def _draw(rng: np.random.Generator) -> tuple[Image.Image, tuple[float, float, float, float]]:
    """A washer on a dark table, and its (centre x, centre y, outer radius, inner radius)."""
    cx, cy = SIZE / 2 + rng.uniform(-5, 5), SIZE / 2 + rng.uniform(-5, 5)
    outer, inner = 92.0, 38.0
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    dist, theta = np.hypot(xx - cx, yy - cy), np.arctan2(yy - cy, xx - cx)
    phase = rng.uniform(0, 2 * math.pi)
    # turning marks: fine concentric rings, plus a light gradient whose direction changes from part to part
    marks = 6 * np.sin(dist * 1.9 + phase) + 3 * np.sin(dist * 0.37 + 2 * phase)
    light_dir = rng.uniform(0, 2 * math.pi)
    light = rng.uniform(-6, 6) + 14 * np.cos(theta - light_dir) * (dist / outer)
    face = 165 + marks + light + rng.normal(0, 3, (SIZE, SIZE))
    table = 36 + rng.normal(0, 2.5, (SIZE, SIZE))
    on_part = (dist <= outer) & (dist >= inner)
    grey = np.where(on_part, face, table)
    rgb = np.stack([grey, grey, grey * 1.03], axis=-1).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(rgb).filter(ImageFilter.GaussianBlur(0.6))
    return image, (cx, cy, outer, inner)
