"""ms / image of each offline backbone and geometry, end to end in the core (not a test: numbers go into the
README): preprocess (crop, resize, pad, tiles) + forward + scoring + the heatmap mapped back onto the
upload at full size, batch 1, as ``clipshot eval`` and the service pay for it.

Settings are timed round-robin (one image each, over and over) so that load from other processes on a
shared machine hits every setting alike; the median per setting is reported, as wall time and as this
process's CPU time (``time.process_time``, all its threads), which other processes' load barely moves.

    python benchmarks/geometry_speed.py [--size 1130x460] [--rounds 15] [--backbones lite0,lite1,lite2]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
import warnings

import numpy as np
import torch
from PIL import Image

from clipshot.backbone import load_backbone
from clipshot.detector import Detector

GEOMETRIES = {  # name -> plan_geometry overrides
    "squash": {"resize": "squash", "tile": 0},
    "auto": {},
}


def _frame(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1130x460", help="upload WIDTHxHEIGHT (ball screw frames: 1130x460)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--backbones", default="lite0,lite1,lite2")
    parser.add_argument("--tile", type=int, default=None, help="also time tiles of this side (pixels)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    width, height = (int(v) for v in args.size.split("x"))
    shots = [_frame(width, height, s) for s in range(4)]
    image = _frame(width, height, 9)
    geometries = dict(GEOMETRIES)
    if args.tile:
        geometries[f"tiles {args.tile}px"] = {"resize": "squash", "tile": args.tile}
    runs = []
    for name in args.backbones.split(","):
        detector = Detector(load_backbone(f"imagenet:efficientnet-{name}", device="cpu"))
        for label, choice in geometries.items():
            geometry = detector.plan_geometry([s.size for s in shots], **choice)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                adapter = detector.fit_memory(shots, category="bench", geometry=geometry, calibration_views=0)
            runs.append((f"{name} {label}", detector, adapter, [], []))
    with torch.inference_mode():
        for _, detector, adapter, _, _ in runs:  # warm-up
            detector.predict([image], adapter)
        for _ in range(args.rounds):
            for _, detector, adapter, wall, cpu in runs:
                start, start_cpu = time.perf_counter(), time.process_time()
                detector.predict([image], adapter, map_size="input")
                wall.append(time.perf_counter() - start)
                cpu.append(time.process_time() - start_cpu)
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads, upload {width}x{height}, batch 1, median of {args.rounds}")
    print("| backbone | geometry | frame | views | wall ms / image | CPU ms / image |\n|---|---|---|---:|---:|---:|")
    for label, _, adapter, wall, cpu in runs:
        name, geometry = label.split(" ", 1)
        g = adapter.geometry
        print(f"| `imagenet:efficientnet-{name}` | {geometry} ({g.resize}) | {g.frame[0]}x{g.frame[1]} | "
              f"{g.views_per_image} | {1000 * statistics.median(wall):.0f} | {1000 * statistics.median(cpu):.0f} |")


if __name__ == "__main__":
    main()
