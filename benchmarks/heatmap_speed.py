"""Cost and size of each heatmap mode on a real photo (median of N): what ``heatmap=`` adds to a request.

Usage: ``python benchmarks/heatmap_speed.py [--image PATH] [--runs 15]`` (default: an MVTec bottle test
image, 900x900). Also times Pillow's own PNG writer on the same overlay, the measurement that decides whether
``app/serving/png_encoder.py`` still earns its place.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from app.serving.heatmap import colour_scale, overlay_image, render  # noqa: E402

DEFAULT_IMAGE = REPO.parent / "shared" / "data" / "mvtec_ad" / "bottle" / "test" / "broken_large" / "000.png"


def median_ms(fn, runs: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(runs):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE)
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    image = Image.open(args.image).convert("RGB")
    yy, xx = torch.meshgrid(torch.arange(40.0), torch.arange(40.0), indexing="ij")
    normal = torch.full((40, 40), 0.1)  # a good part: nothing above the threshold
    defect = 0.1 + 0.3 * torch.exp(-((yy - 12) ** 2 + (xx - 25) ** 2) / 8)  # one blob, ~3 % of the area
    threshold = 0.2
    print(f"{args.image.name} {image.size[0]}x{image.size[1]}, upload {args.image.stat().st_size / 1e6:.2f} MB\n")
    print("| mode | normal part ms | defect ms | bytes (defect) |\n|---|---:|---:|---:|")
    for mode in ("jpeg", "png", "mask", "regions", "raw"):
        ms_normal, _ = median_ms(lambda m=mode: render(image, normal, threshold, m), args.runs)
        ms, out = median_ms(lambda m=mode: render(image, defect, threshold, m), args.runs)
        print(f"| `{mode}` | {ms_normal:.1f} | {ms:.1f} | {len(out.data):,} |")
    heat = defect
    vmin, vmax = colour_scale(threshold)
    picture = overlay_image(image, heat, vmin=vmin, vmax=vmax)
    for level in (1, 6):
        def pil_png(level=level) -> bytes:
            buffer = io.BytesIO()
            picture.save(buffer, "PNG", compress_level=level)
            return buffer.getvalue()
        ms, out = median_ms(pil_png, args.runs)
        print(f"| defect overlay via Pillow PNG (compress_level={level}), encode only | | {ms:.1f} | {len(out):,} |")
    from app.serving.png_encoder import encode_png

    ms, out = median_ms(lambda: encode_png(np.asarray(picture)), args.runs)
    print(f"| defect overlay via png_encoder, encode only | | {ms:.1f} | {len(out):,} |")


if __name__ == "__main__":
    main()
