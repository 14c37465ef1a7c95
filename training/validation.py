"""Validation without test data: held-out normal shots against synthetic anomalies made from them.

Why: a newly registered product has no defect photos, and its few normal photos are all we may use. Holding some
out and damaging them synthetically gives a fixed, seeded yardstick on which "memory only" and "fine-tuned" are
compared; both see the same images, and neither has the held-out shots in its memory bank.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from clipshot.adapter import Adapter
from clipshot.detector import FEATURE_BATCH, Detector
from clipshot.synthetic.anomalies import AnomalySynthesizer
from clipshot.synthetic.augment import NormalAugment
from training.step import auroc

__all__ = ["ValidationSet", "adapter_auroc", "synthetic_validation_set"]


@dataclass
class ValidationSet:
    """(N, 3, S, S) images in [0, 1] and their labels (0 normal, 1 synthetic anomaly)."""

    pixels: torch.Tensor
    labels: list[int]

    @property
    def normals(self) -> int:
        return self.labels.count(0)

    @property
    def anomalies(self) -> int:
        return self.labels.count(1)


def synthetic_validation_set(held: torch.Tensor, sources: Sequence[torch.Tensor], *, synthesizer: AnomalySynthesizer,
                             augment: NormalAugment, anomalies_per_shot: int, normal_views: int,
                             seed: int) -> ValidationSet:
    """Each held-out shot, ``normal_views`` normal-preserving variants of it, and ``anomalies_per_shot`` synthetic
    anomalies of it (textures may come from ``sources``, the training shots); one fixed seed, so the yardstick is
    the same for both candidates and for every run."""
    g = torch.Generator().manual_seed(seed)
    always = replace(synthesizer, p=1.0)
    normals: list[torch.Tensor] = []
    anomalous: list[torch.Tensor] = []
    for shot in held:
        normals.append(shot)
        normals.extend(augment(shot, g) for _ in range(normal_views))
        made = 0
        for _ in range(4 * anomalies_per_shot):  # a try can fail on a flat region; bounded retries
            out, _mask, label = always(shot, list(sources) + [shot], g)
            if label:
                anomalous.append(out)
                made += 1
            if made >= anomalies_per_shot:
                break
    return ValidationSet(torch.stack(normals + anomalous), [0] * len(normals) + [1] * len(anomalous))


@torch.inference_mode()
def adapter_auroc(detector: Detector, adapter: Adapter, data: ValidationSet) -> float | None:
    """Image AUROC of ``adapter``'s full scorer (whatever branches it has) on ``data``."""
    scores: list[float] = []
    for start in range(0, len(data.pixels), FEATURE_BATCH):
        pixels = detector.backbone.normalise(data.pixels[start : start + FEATURE_BATCH])
        feats = detector.features(pixels, adapter, dpam=adapter.scoring.dpam)
        scores.extend(detector.score_features(feats, adapter)[0].float().cpu().tolist())
    return auroc(data.labels, scores)
