"""Per-candidate selection evidence for one product (not a test): what ``clipshot.scoring_selection`` sees.

For each seed's shots (the eval's shot rule) the calibration evidence is gathered once and every candidate scoring
is applied to it; one JSON line per candidate: the image and pixel separation AUROCs the selection uses, and two
non-saturating measures looked at when AUROCs tie (d' of the log scores: median synthetic minus mean normal over
the normals' spread; the margin: the synthetic scores' lowest decile minus the largest normal, in logs).

    python benchmarks/selection_evidence.py ../shared/data/bsdata ball_screw 0,3 4 --feature-cache /tmp/f
"""

from __future__ import annotations

import argparse
import json
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
from accuracy_suite import CachedDetector

from clipshot import calibration_evidence as evidence
from clipshot import scoring_selection as selection
from clipshot.adapter import Adapter
from clipshot.backbone import load_backbone
from clipshot.chunked import finish
from clipshot.evaluation.dataset import list_train_good, load_image
from clipshot.evaluation.shots import select_shots
from clipshot.fusion import ScoringConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path)
    parser.add_argument("category")
    parser.add_argument("seeds")
    parser.add_argument("shots", type=int)
    parser.add_argument("--feature-cache", type=Path, default=None)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    detector = CachedDetector(load_backbone("imagenet:efficientnet-lite0", device="cpu", precision="fp32"),
                              disk=args.feature_cache)
    for seed in map(int, args.seeds.split(",")):
        paths = select_shots(list_train_good(args.root, args.category), args.shots, category=args.category, seed=seed)
        shots = [load_image(p) for p in paths]
        adapter = Adapter(category=args.category, backbone=detector.layout(),
                          geometry=detector.resolve_geometry(None, [img.size for img in shots]))
        found = finish(evidence.gather(detector, adapter, shots, detector.features_of(shots, adapter), 2))
        for name, cfg in selection.candidates(ScoringConfig(), staged=detector.backbone.stage_dims is not None):
            loo = finish(evidence.leave_one_out(detector, replace(adapter, scoring=cfg), found))
            normal, synthetic = np.log(loo.normal), np.log(loo.synthetic)
            inside = loo.synthetic_maps[found.masks > 0.5].float().clamp_min(1e-9).log()
            outside = loo.normal_maps.flatten().float().clamp_min(1e-9).log()
            print(json.dumps({
                "cat": args.category, "seed": seed, "name": name,
                "img": selection.image_separation(loo.normal, loo.synthetic),
                "pix": selection.pixel_separation(loo.synthetic_maps, found.masks, loo.normal_maps),
                "dprime": float((np.median(synthetic) - normal.mean()) / normal.std(ddof=1)),
                "margin": float(np.quantile(synthetic, 0.1) - normal.max()),
                "pixd": float((inside.median() - outside.mean()) / outside.std())}), flush=True)


if __name__ == "__main__":
    main()
