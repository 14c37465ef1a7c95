"""Screen memory-branch candidates from the few-shot literature through the accuracy suite (research, not shipped).

Each candidate replaces one piece of the shipped memory branch for the length of one suite run, so everything
else — shots, geometry, calibration, metrics, the feature cache — is the suite's own:

* ``--metric subspace``: SubspaceAD-style distance, the residual of each patch (per backbone stage, centred on
  the normal mean) outside the principal subspace holding ``--variance`` of the normal patches' variance.
* ``--metric mahalanobis``: one Gaussian of the normal patches per stage, covariance shrunk towards its mean
  eigenvalue by ``--shrink`` (Ledoit-Wolf style); distance = whitened norm / sqrt(dim).
* ``--metric whitened``: nearest neighbour after that whitening (Mahalanobis kNN).
* ``--augment hvr``: AnomalyDINO-style memory augmentation — the shots' horizontal flips (h), vertical flips (v)
  and 180-degree rotations (r) join the served memory (not the leave-one-out banks, so F1 at the threshold is
  pessimistic for this candidate).

    python benchmarks/memory_screen.py --metric mahalanobis -- --data ../shared/data --out /tmp/m --shots 4 \\
        --seeds 0 1 2 --feature-cache /tmp/featcache

Arguments after ``--`` go to ``benchmarks/accuracy_suite.py``. Results: ``docs/results/memory-screen/``.
"""

from __future__ import annotations

import argparse
import runpy
import sys
from collections.abc import Generator
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from clipshot import detector as detector_module
from clipshot import memory_branch
from clipshot.features import Features

SUITE = Path(__file__).with_name("accuracy_suite.py")
FLIPS = {"h": Image.Transpose.FLIP_LEFT_RIGHT, "v": Image.Transpose.FLIP_TOP_BOTTOM, "r": Image.Transpose.ROTATE_180}


def _stats(bank: memory_branch.MemoryBank, key: tuple, part: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(mean, eigenvalues descending, eigenvectors) of one stage's normal patches, computed once per bank."""
    cache = bank.__dict__.setdefault("_screen_stats", {})
    if key not in cache:
        x = part.float()
        mu = x.mean(0)
        centred = x - mu
        evals, evecs = torch.linalg.eigh(centred.t() @ centred / max(1, x.shape[0] - 1))
        cache[key] = (mu, evals.flip(0).clamp_min(0), evecs.flip(1))
    return cache[key]


def metric_distances(metric: str, variance: float, shrink: float):
    """A ``MemoryBank.distances`` replacement computing ``metric`` per stage and averaging, as the shipped one."""

    def distances(self: memory_branch.MemoryBank, features: Features, precision: str | None = None) -> torch.Tensor:
        h, w = features.grid
        first = features.patches[0]
        total = torch.zeros(first.shape[0] * first.shape[1])
        terms = 0
        for layer, query in enumerate(features.patches):
            bank_parts = memory_branch._split(self.layers[layer].float(), self.stages)
            query_parts = memory_branch._split(query.reshape(-1, query.shape[-1]).float(), self.stages)
            for stage, (normal, q) in enumerate(zip(bank_parts, query_parts, strict=True)):
                mu, evals, evecs = _stats(self, (layer, stage), normal)
                if metric == "subspace":
                    keep = int((torch.cumsum(evals, 0) / evals.sum() < variance).sum()) + 1
                    basis = evecs[:, :keep]
                    centred = q - mu
                    d = (centred - (centred @ basis) @ basis.t()).norm(dim=1)
                else:
                    scale = evecs / ((1 - shrink) * evals + shrink * evals.mean()).sqrt()
                    zq = (q - mu) @ scale
                    if metric == "mahalanobis":
                        d = zq.norm(dim=1)
                    else:
                        zb = (normal - mu) @ scale
                        d = torch.cat([torch.cdist(zq[i:i + 2048], zb).amin(1) for i in range(0, len(zq), 2048)])
                    d = d / scale.shape[1] ** 0.5
                total += d
                terms += 1
        return (total / terms).view(first.shape[0], h, w)

    return distances


def augmenting(flips: str):
    """``refit_memory_steps`` / ``memory_bank_steps`` replacements adding the shots' ``flips`` to the memory."""
    shots_of: dict[int, list[Image.Image]] = {}
    refit = detector_module.Detector.refit_memory_steps
    bank_steps = detector_module.Detector.memory_bank_steps

    def refit_memory_steps(self: Any, adapter: Any, shots: Any, **kwargs: Any) -> Any:
        shots_of[id(adapter)] = list(shots)
        return refit(self, adapter, shots, **kwargs)

    def memory_bank_steps(self: Any, feats: Features, adapter: Any, coreset_ratio: float | None = None
                          ) -> Generator[None, None, Any]:
        shots = shots_of.get(id(adapter))
        if shots is not None and feats.batch_size == len(shots):  # the served bank, not a leave-one-out one
            extra = [self.features_of([s.transpose(FLIPS[f]) for s in shots], adapter) for f in flips]
            feats = Features.cat([feats, *extra])
        return (yield from bank_steps(self, feats, adapter, coreset_ratio))

    return refit_memory_steps, memory_bank_steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--metric", choices=("nearest", "subspace", "mahalanobis", "whitened"), default="nearest")
    parser.add_argument("--variance", type=float, default=0.99, help="subspace: variance the kept basis holds")
    parser.add_argument("--shrink", type=float, default=0.1, help="mahalanobis / whitened: covariance shrinkage")
    parser.add_argument("--augment", default="", help="any of h, v, r: flipped / rotated shots in the memory")
    args, suite_args = parser.parse_known_args()
    if args.metric != "nearest":
        memory_branch.MemoryBank.distances = metric_distances(args.metric, args.variance, args.shrink)
    if args.augment:
        if set(args.augment) - set(FLIPS):
            parser.error(f"--augment takes letters of {''.join(FLIPS)}")
        refit, bank = augmenting(args.augment)
        detector_module.Detector.refit_memory_steps = refit
        detector_module.Detector.memory_bank_steps = bank
    sys.argv = [str(SUITE), *[a for a in suite_args if a != "--"]]
    runpy.run_path(str(SUITE), run_name="__main__")


if __name__ == "__main__":
    main()
