"""Registration speed: memory adapter ready time and fine-tune time at the default budget (not a test).

On a GPU the real architecture is timed with random weights (``open_clip:ViT-B-16-plus-240:random``,
bf16 autocast); on CPU the tiny test model times the pipeline only. Weights' values do not change speed.

    python benchmarks/train_speed.py [--shots 16] [--steps N] [--backbone SPEC]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from PIL import Image

from clipshot.backbone import load_backbone
from clipshot.detector import Detector
from training.fewshot import FewShotConfig, train_fewshot


def _shots(count: int, size: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = np.stack([np.sin(6 * xx + 4 * yy), np.cos(4 * xx - 6 * yy), np.sin(8 * xx)], -1) * 0.25 + 0.5
    return [Image.fromarray((np.clip(base + rng.normal(0, 0.02, base.shape), 0, 1) * 255).astype(np.uint8))
            for _ in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--steps", type=int, default=None, help="default: FewShotConfig's default budget")
    parser.add_argument("--backbone", default=None)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    spec = args.backbone or ("open_clip:ViT-B-16-plus-240:random" if cuda else "test:tiny-clip")
    detector = Detector(load_backbone(spec, device="cuda" if cuda else "cpu", precision="bf16" if cuda else "fp32"))
    shots = _shots(args.shots, 900 if cuda else 128)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    adapter = detector.fit_memory(shots, category="bench")
    if cuda:
        torch.cuda.synchronize()
    ready = time.perf_counter() - start
    config = FewShotConfig() if args.steps is None else FewShotConfig(steps=args.steps)
    start = time.perf_counter()
    result = train_fewshot(detector, shots, category="bench", config=config)
    total = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    device = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"| backbone | device | shots | memory adapter ready s | fine-tune steps | fine-tune s (total) | "
          f"peak GPU GiB |\n|---|---|---|---|---|---|---|\n| {spec} | {device} | {args.shots} | {ready:.2f} | "
          f"{config.steps} | {result.seconds:.1f} ({total:.1f}) | {peak:.2f} |")
    print(f"branches: {adapter.branches}; validation: {result.metrics}")


if __name__ == "__main__":
    main()
