"""Do the regions the service outlines point at the defect? (Not part of the test suite.)

For every defective test image of every MVTec-layout dataset under ``--data`` (found by walking the tree, as the
accuracy suite does), with an adapter registered as a new user gets it (``Detector.fit_memory``, shipped defaults,
the offline backbone, 4 shots, seeds 0-2), the map is taken through the service's own path — the frame grid placed
back over the image (``Geometry.image_grid``), the prediction's ``map_threshold`` and colour scale, and the ranked
areas of ``app.serving.heatmap.rank_components`` (what the overlay numbers 1, 2, 3 and ``regions`` lists) — at
the ground-truth mask's resolution (``--mask-size``, the suite's 256 px). It reports:

- **top-1 hit**: the strongest region shares at least one pixel with the defect's mask;
- **top-3 hit**: any of the three outlined regions does;
- **peak on defect**: the strongest region's highest pixel lies on the mask (stricter: a region covering much of
  the part overlaps any defect), and **on defect**: the share of the strongest region's pixels on the mask;
- all over the defective images the adapter flagged (the overlay a quality engineer looks at) and over all
  defective images (a missed defect has no region, so it counts as a miss there);
- regions per flagged defective image, and the share of the image the outlined regions cover.

Features go through ``accuracy_suite.CachedDetector`` (``--feature-cache``, the suite's folder), so a dataset whose
test set the suite has extracted costs only scoring.

    python benchmarks/region_hit_rate.py --data ../shared/data --feature-cache /tmp/featcache \\
        --out docs/results/region-hit-rate
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy_suite import CachedDetector, discover  # noqa: E402

from app.serving.heatmap import OVERLAY_REGIONS, rank_components, upsample  # noqa: E402
from clipshot.anomaly_map import colour_scale  # noqa: E402
from clipshot.backbone import load_backbone  # noqa: E402
from clipshot.evaluation.dataset import (  # noqa: E402
    list_test_samples,
    list_train_good,
    load_image,
    load_mask,
    parse_mask_size,
)
from clipshot.evaluation.shots import select_shots  # noqa: E402
from clipshot.features import FEATURE_BATCH  # noqa: E402
from clipshot.prediction import make_prediction  # noqa: E402

BATCH = 16  # the suite's batches (run_protocol's default), cut like Detector.predict: the cache keys match


def measure(detector: CachedDetector, parent: Path, category: str, shots: int, seed: int,
            mask_size: int) -> dict[str, Any]:
    """Hit counts for one (dataset, seed) run."""
    shot_images = [load_image(p) for p in select_shots(list_train_good(parent, category), shots, category=category,
                                                       seed=seed)]
    adapter = detector.fit_memory(shot_images, category=category)
    samples = list_test_samples(parent, category)
    counts = {"defective": sum(s.label for s in samples), "flagged": 0, "top1": 0, "top3": 0, "regions": 0,
              "outlined_pct": 0.0, "peak_on": 0, "top1_precision": 0.0}
    step = min(BATCH, FEATURE_BATCH)
    for start in range(0, len(samples), step):  # every test image, in the suite's batches (its cached features)
        batch = samples[start:start + step]
        images = [load_image(s.path) for s in batch]
        with torch.inference_mode():
            scores, heats = detector.forward(detector.backbone.preprocess(images, adapter.geometry), adapter)
        for sample, image, score, heat in zip(batch, images, scores.tolist(), heats, strict=True):
            if not sample.label:
                continue
            pred = make_prediction(score, heat, adapter, image.size, None)
            grid = adapter.geometry.image_grid(heat, image.size, heat.shape[-1])
            vmin, _ = colour_scale(pred.map_threshold)
            big = upsample(grid, (mask_size, mask_size))  # the suite's masks are squashed to a square too
            comp = rank_components(big, vmin)
            if comp is None:
                continue
            counts["flagged"] += 1
            counts["regions"] += comp.count
            truth = load_mask(sample, mask_size) > 0
            hits = [bool(np.any(comp.mask(r) & truth)) for r in range(min(OVERLAY_REGIONS, comp.count))]
            counts["top1"] += hits[0]
            strongest = comp.mask(0)
            peak = np.unravel_index(np.argmax(np.where(strongest, big, -np.inf)), big.shape)
            counts["peak_on"] += bool(truth[peak])
            counts["top1_precision"] += float(np.count_nonzero(strongest & truth) / np.count_nonzero(strongest))
            counts["top3"] += any(hits)
            outlined = sum(int(comp.areas[label]) for label in comp.order[:OVERLAY_REGIONS])
            counts["outlined_pct"] += 100.0 * outlined / big.size
    return counts


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    total = {k: sum(r[k] for r in rows) for k in ("defective", "flagged", "top1", "top3", "regions", "outlined_pct",
                                                   "peak_on", "top1_precision")}
    flagged = max(1, total["flagged"])
    return {"defective": total["defective"], "flagged": total["flagged"],
            "top1_of_flagged": total["top1"] / flagged, "top3_of_flagged": total["top3"] / flagged,
            "top1_of_defective": total["top1"] / max(1, total["defective"]),
            "top3_of_defective": total["top3"] / max(1, total["defective"]),
            "peak_on_defect_of_flagged": total["peak_on"] / flagged,
            "top1_share_on_defect": total["top1_precision"] / flagged,
            "regions_per_flagged": total["regions"] / flagged,
            "outlined_pct_per_flagged": total["outlined_pct"] / flagged,
            "per_seed_top1_of_flagged": [r["top1"] / max(1, r["flagged"]) for r in rows]}


def markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    lines = [f"# Region hit rate — `{s['backbone']}`, {s['shots']} shots, seeds {s['seeds']}", "",
             f"Command: `{' '.join(s['command'])}` ({s['minutes']} min on {s['machine']}). Masks and maps at "
             f"{s['mask_size']} px; a hit = the region shares at least one pixel with the ground-truth mask; the "
             f"overlay outlines the {OVERLAY_REGIONS} strongest regions (by peak). Runs summed over seeds.", "",
             "| dataset | defective images | flagged | top-1 hit (of flagged) | top-3 hit (of flagged) | "
             "top-1 hit (of all defective) | top-3 hit (of all defective) | top-1 peak on defect (of flagged) | "
             "top-1 pixels on defect | regions per flagged image | outlined area (% of image) | top-1 per seed |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, r in result["datasets"].items():
        per_seed = ", ".join(f"{100 * v:.0f}" for v in r["per_seed_top1_of_flagged"])
        lines.append(f"| {name} | {r['defective']} | {r['flagged']} | {100 * r['top1_of_flagged']:.1f} % | "
                     f"{100 * r['top3_of_flagged']:.1f} % | {100 * r['top1_of_defective']:.1f} % | "
                     f"{100 * r['top3_of_defective']:.1f} % | {100 * r['peak_on_defect_of_flagged']:.1f} % | "
                     f"{100 * r['top1_share_on_defect']:.1f} % | {r['regions_per_flagged']:.1f} | "
                     f"{r['outlined_pct_per_flagged']:.1f} | {per_seed} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--backbone", default="imagenet:efficientnet-lite0")
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--datasets", nargs="*", default=None, help="substrings of dataset paths to keep")
    parser.add_argument("--mask-size", default="256")
    parser.add_argument("--feature-cache", type=Path, default=None,
                        help="the accuracy suite's feature folder (features are keyed by the exact pixels)")
    args = parser.parse_args()
    mask_size = parse_mask_size(args.mask_size)
    if mask_size == "full":
        raise SystemExit("--mask-size must be a number of pixels here")
    detector = CachedDetector(load_backbone(args.backbone, device="cpu", precision="fp32"), disk=args.feature_cache)
    datasets = [d for d in discover(args.data) if not args.datasets or any(sel in d[0] for sel in args.datasets)]
    if not datasets:
        raise SystemExit(f"no MVTec-layout dataset under {args.data}")
    started = time.perf_counter()
    results: dict[str, Any] = {}
    for name, parent, category in datasets:
        rows = []
        for seed in args.seeds:
            rows.append(measure(detector, parent, category, args.shots, seed, mask_size))
            print(f"{name} seed={seed}: {rows[-1]}", flush=True)
        results[name] = summarise(rows) | {"runs": rows}
    result = {"datasets": results,
              "settings": {"backbone": args.backbone, "shots": args.shots, "seeds": args.seeds,
                           "mask_size": mask_size, "command": ["python", *sys.argv],
                           "machine": f"{platform.machine()} {torch.get_num_threads()} torch threads",
                           "minutes": round((time.perf_counter() - started) / 60, 1),
                           "feature_cache": {"hits": detector.hits, "misses": detector.misses}}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=1, default=float))
    text = markdown(result)
    (args.out / "results.md").write_text(text)
    print(text, flush=True)


if __name__ == "__main__":
    main()
