"""Seed screen of image-score, resolution, layer and memory-augmentation candidates (issue 10), memory mode.

One feature pass per configuration, then every image-score rule on the same patch distances, so the rules
are compared on identical maps. Not the shipped pipeline: no calibration, and pixel metrics on masks at half
the image size when the long side is over 600 px (the ``clipshot eval`` command gives the reportable numbers).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/image_score_screen.py --data ../shared/data/bsdata --category ball_screw \
        [--backbone imagenet:efficientnet-lite0] [--size 320] [--layers 8,16] [--augment none|h|v|hvr] \
        [--seed 0] [--shots 4] [--pixel]

``--size`` is the square model size the native frame is derived from (same pixel count, the shots' aspect:
320 -> 208x496 on 1130x460 frames, 480 -> 304x752, 720 -> 464x1136, i.e. the full frame); square images are
squashed to ``size``. ``--layers`` the two output strides whose features are concatenated (fine grid first).
``--augment`` adds horizontally (h) / vertically (v) flipped and 180-degree rotated (r) shots to the memory.
``--no-center`` measures distances around the origin (memory before issue 10's centring); ``--joint-stages`` one
cosine over the concatenated stages instead of one per stage.
Prints one JSON line: image AUROC of each score rule, ms/image of features + nearest neighbours.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGE_SCORES = ("smoothed peak_mean (shipped)", "smoothed max (peak)", "raw patch max", "raw top 0.1 %",
                "raw top 1 % (AnomalyDINO)", "smoothed top 1 %", "smoothed max sigma 2", "smoothed max sigma 8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--category", required=True)
    parser.add_argument("--backbone", default="imagenet:efficientnet-lite0")
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--layers", default="8,16")
    parser.add_argument("--augment", default="none")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--pixel", action="store_true", help="also pixel AUROC and AUPRO (half-size masks)")
    parser.add_argument("--no-center", action="store_true", help="distances around the origin (before issue 10)")
    parser.add_argument("--joint-stages", action="store_true",
                        help="one cosine over the concatenated stages (before per-stage scoring)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from clipshot.adapter import Adapter
    from clipshot.anomaly_map import pixel_map
    from clipshot.backbone import load_backbone
    from clipshot.detector import Detector
    from clipshot.evaluation.dataset import list_test_samples, list_train_good, load_image, load_mask
    from clipshot.evaluation.metrics import aupro, image_auroc, pixel_auroc
    from clipshot.evaluation.shots import select_shots
    from clipshot.fusion import ScoringConfig, map_score
    from clipshot.geometry import ASPECT_LIMIT, Geometry, native_frame

    detector = Detector(load_backbone(args.backbone, device="cpu"))
    detector.backbone.layers = tuple(int(s) for s in args.layers.split(","))
    paths = select_shots(list_train_good(args.data, args.category), args.shots, category=args.category,
                         seed=args.seed)
    shots = [load_image(p) for p in paths]
    samples = list_test_samples(args.data, args.category)
    images = [load_image(s.path) for s in samples]
    labels = [s.label for s in samples]
    width, height = shots[0].size
    aspect = width / height
    if max(aspect, 1 / aspect) >= ASPECT_LIMIT:
        geometry = Geometry(resize="native", frame=native_frame(aspect, args.size, detector.backbone.frame_multiple))
    else:
        geometry = Geometry(resize="squash", frame=(args.size, args.size))
    scoring = ScoringConfig(memory_center=not args.no_center, memory_stages=not args.joint_stages)
    adapter = Adapter(category=args.category, scoring=scoring, backbone=detector.layout())
    adapter.geometry = geometry
    memory_images = list(shots)
    if "h" in args.augment:
        memory_images += [ImageOps.mirror(s) for s in shots]
    if "v" in args.augment:
        memory_images += [ImageOps.flip(s) for s in shots]
    if "r" in args.augment:
        memory_images += [s.rotate(180) for s in shots]
    bank = detector.memory_bank(detector.features_of(memory_images, adapter), adapter)
    start = time.perf_counter()
    raw = torch.cat([bank.distances(detector.features_of(images[i : i + 16], adapter))
                     for i in range(0, len(images), 16)])
    ms = 1000 * (time.perf_counter() - start) / len(images)
    smooth = pixel_map(raw, geometry.frame, 4.0)
    flat, sflat = raw.flatten(1), smooth.flatten(1)

    def top(x: torch.Tensor, fraction: float) -> torch.Tensor:
        return x.topk(max(1, round(fraction * x.shape[1])), dim=1).values.mean(1)

    rules = (map_score(smooth, ScoringConfig(image_score="peak_mean")),
             map_score(smooth, ScoringConfig(image_score="peak")),
             flat.amax(1), top(flat, 0.001), top(flat, 0.01), top(sflat, 0.01),
             pixel_map(raw, geometry.frame, 2.0).flatten(1).amax(1),
             pixel_map(raw, geometry.frame, 8.0).flatten(1).amax(1))
    out = {"category": args.category, "backbone": args.backbone, "frame": list(geometry.frame), "layers": args.layers,
           "augment": args.augment,
           "center": not args.no_center, "seed": args.seed, "memory_patches": bank.size, "ms_per_image": round(ms)}
    for name, scores in zip(IMAGE_SCORES, rules, strict=True):
        out[name] = round(100 * image_auroc(labels, scores.numpy()), 2)
    if args.pixel:
        size = (height // 2, width // 2) if max(height, width) > 600 else (height, width)
        masks, maps = [], []
        for sample, image, heat in zip(samples, images, smooth, strict=True):
            mask = Image.fromarray(load_mask(sample, "full").astype(np.uint8) * 255)
            masks.append(np.asarray(mask.resize((size[1], size[0]), Image.Resampling.NEAREST)) > 127)
            maps.append(geometry.map_back(heat, image.size, detector.backbone.image_size, size))
        out.update(pixel_auroc=round(100 * pixel_auroc(masks, maps), 2), aupro=round(100 * aupro(masks, maps), 2))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
