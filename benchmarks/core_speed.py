"""Feature extraction + scoring speed per backbone (not a test: numbers go into the README).

Weights' values do not change speed, so the real CLIP architecture is timed with random weights
(``open_clip:ViT-B-16-plus-240:random``) on a GPU when one is present.

    python benchmarks/core_speed.py [--device auto] [--precision bf16] [--repeats 20]
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import time

import numpy as np
import torch
from PIL import Image

from clipshot import lora
from clipshot.adapter import Adapter
from clipshot.backbone import load_backbone
from clipshot.detector import Detector


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _images(count: int, size: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(count)]


def _p50(detector: Detector, pixels: torch.Tensor, adapter: Adapter, repeats: int) -> float:
    device = detector.backbone.device
    for _ in range(3):
        detector.forward(pixels, adapter)
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        detector.forward(pixels, adapter)
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _with_lora(detector: Detector, adapter: Adapter) -> Adapter:
    """The same adapter plus a LoRA on every default target, with non-zero B (as after fine-tuning)."""
    visual, spec = detector.backbone.visual, lora.LoraSpec()
    lora.add_adapter(visual, "bench-shape", spec)
    shapes = lora.state(visual, "bench-shape")
    lora.remove_adapter(visual, "bench-shape")
    state = {k: torch.full_like(v, 0.01) for k, v in shapes.items()}
    return dataclasses.replace(adapter, lora=spec, lora_state=state, uid="bench-lora")


def bench(spec: str, device: str, precision: str, repeats: int) -> list[dict]:
    """Rows per batch size: the memory/text adapter, and on CLIP the same with a LoRA run as branches and folded."""
    detector = Detector(load_backbone(spec, device=device, precision=precision))
    backbone = detector.backbone
    adapter = detector.fit_memory(_images(4, backbone.image_size), category="bench", calibration_views=0)
    variants = [("+".join(adapter.branches), adapter, False)]
    if backbone.supports_text:
        tuned = _with_lora(detector, adapter)
        variants += [(variants[0][0] + "+LoRA branch", tuned, False), (variants[0][0] + "+LoRA folded", tuned, True)]
    rows = []
    for batch in (1, 32):
        pixels = backbone.preprocess(_images(batch, backbone.image_size))
        for label, variant, folded in variants:
            detector.merge_lora = folded
            p50 = _p50(detector, pixels, variant, repeats)
            rows.append({
                "backbone": spec, "device": str(backbone.device), "precision": backbone.precision, "batch": batch,
                "branches": label, "ms_per_batch_p50": 1000 * p50,
                "ms_per_image": 1000 * p50 / batch, "images_per_s": batch / p50,
            })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default=None, help="default: auto (bf16 on capable GPUs, fp32 on CPU)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--specs", nargs="*", default=None,
                        help="backbones to time (default: tiny-clip and efficientnet-lite0, + ViT-B-16+ on GPU)")
    args = parser.parse_args()
    cuda = torch.cuda.is_available() and args.device != "cpu"
    precision = args.precision or "auto"
    specs = args.specs or ["test:tiny-clip", "imagenet:efficientnet-lite0"]
    if cuda and not args.specs:
        specs.append("open_clip:ViT-B-16-plus-240:random")
    name = torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine()
    print(f"machine: {name}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print("| backbone | device | precision | branches | batch | ms/batch p50 | ms/image | images/s |")
    print("|---|---|---|---|---|---|---|---|")
    for spec in specs:
        for row in bench(spec, "cuda" if cuda else "cpu", precision, args.repeats):
            print(f"| {row['backbone']} | {row['device']} | {row['precision']} | {row['branches']} | {row['batch']} | "
                  f"{row['ms_per_batch_p50']:.1f} | {row['ms_per_image']:.2f} | {row['images_per_s']:.0f} |")


if __name__ == "__main__":
    main()
