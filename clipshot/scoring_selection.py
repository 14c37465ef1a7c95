"""Each product chooses its memory scoring from its own shots.

No fixed scoring rule is right for every product. Measuring distances around the shots' mean patch helps a
product whose normal look varies along a shared direction (a spindle in several positions) and ruins one whose
patches are all alike (a paper texture: the mean *is* the texture, and what is left after removing it is noise).
Which one a customer's product is cannot be known in advance, but it can be measured at registration on the only
evidence there is: the leave-one-out scores of the good shots and the synthetic defects made from them
(``clipshot.calibration_evidence``). Each candidate scoring is applied to the *same* features (no extra backbone
pass), and the one that best separates that product's synthetic defects from its own unseen normals wins.

Separation is measured twice, without weights to tune:
- ``image``: the probability that a synthetic defect image scores above a leave-one-out normal image (AUROC),
  what the verdict rests on;
- ``pixel``: the probability that a pixel inside a synthetic defect's mask scores above a pixel of a normal image
  (AUROC), what the heatmap rests on; it is what collapses when a scoring turns normal texture into noise.
The candidate's evidence is their mean. Ties keep the earlier candidate in ``candidates``' order, which starts with
the scoring of the previous release (distances from the origin, the map maximum): a product gets a less proven
rule only if its own shots say it separates better.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from clipshot import calibration_evidence as evidence
from clipshot.adapter import Adapter
from clipshot.chunked import Steps
from clipshot.fusion import ScoringConfig

if TYPE_CHECKING:
    from clipshot.detector import Detector

RULE = "mean of image and pixel AUROC of synthetic defects vs leave-one-out normals; ties keep the earlier candidate"
PIXEL_POOL = 4  # maps are average-pooled 4x4 before the pixel AUROC: same ranking, 16x fewer pixels to sort
TIE = 1e-6  # AUROCs closer than this are equal (float noise of the sort), so the earlier candidate stays


def candidates(base: ScoringConfig, *, staged: bool) -> list[tuple[str, ScoringConfig]]:
    """The scorings a product chooses between, most proven first: origin or centred distances, one cosine per
    backbone stage or one over all (only where the backbone concatenates stages), map maximum or peak-mean."""
    out = []
    for center in (False, True):
        for stages in ((False, True) if staged else (base.memory_stages,)):
            for score in ("peak", "peak_mean"):
                cfg = replace(base, memory_center=center, memory_stages=stages, image_score=score)
                name = f"{'centred' if center else 'origin'}{'-staged' if staged and stages else ''}-{score}"
                out.append((name, cfg))
    return out


def image_separation(normal: Sequence[float], defects: Sequence[float]) -> float | None:
    """AUROC of synthetic-defect image scores against leave-one-out normal scores (None without both)."""
    if not len(normal) or not len(defects):
        return None
    labels = np.r_[np.zeros(len(normal)), np.ones(len(defects))]
    return float(roc_auc_score(labels, np.r_[np.asarray(normal, float), np.asarray(defects, float)]))


def pixel_separation(defect_maps: torch.Tensor, defect_masks: torch.Tensor, normal_maps: torch.Tensor) -> float | None:
    """AUROC of pixels inside the synthetic defects' masks against every pixel of the normal images' maps.

    ``defect_maps``/``defect_masks`` are (N, H, W) at the same resolution, ``normal_maps`` (M, H, W). Pixels of a
    defect image outside its mask are left out: a pasted patch disturbs its surroundings a little, and whether
    that spill counts as a miss is not what is being chosen here."""
    if defect_maps.numel() == 0 or normal_maps.numel() == 0:
        return None
    pooled = F.avg_pool2d(defect_maps[:, None].float(), PIXEL_POOL, ceil_mode=True)[:, 0]
    inside = F.avg_pool2d(defect_masks[:, None].float(), PIXEL_POOL, ceil_mode=True)[:, 0] > 0.5
    positives = pooled[inside]
    negatives = F.avg_pool2d(normal_maps[:, None].float(), PIXEL_POOL, ceil_mode=True).flatten()
    if positives.numel() == 0:
        return None
    scores = torch.cat([negatives, positives]).cpu().numpy()
    labels = np.r_[np.zeros(negatives.numel()), np.ones(positives.numel())]
    return float(roc_auc_score(labels, scores))


@dataclass(frozen=True)
class CandidateEvidence:
    """How well one candidate scoring separated the product's synthetic defects from its unseen normals."""

    name: str
    scoring: ScoringConfig
    image: float | None
    pixel: float | None

    @property
    def separation(self) -> float:
        known = [v for v in (self.image, self.pixel) if v is not None]
        return float(np.mean(known)) if known else float("-inf")

    def to_dict(self) -> dict:
        return {"name": self.name, "image_separation": self.image, "pixel_separation": self.pixel,
                "separation": None if not np.isfinite(self.separation) else self.separation,
                "memory_center": self.scoring.memory_center, "memory_stages": self.scoring.memory_stages,
                "image_score": self.scoring.image_score}


def choose(evidence: Sequence[CandidateEvidence]) -> int:
    """Index of the candidate with the best separation; the earliest one wins ties."""
    if not evidence:
        raise ValueError("no candidate scoring to choose from")
    best = 0
    for i, item in enumerate(evidence):
        if item.separation > evidence[best].separation + TIE:
            best = i
    return best


def selection_record(evidence: Sequence[CandidateEvidence], chosen: int) -> dict:
    """What the bundle keeps (and ``GET /v1/categories/{c}`` shows): the rule, the choice, every candidate."""
    return {"rule": RULE, "chosen": evidence[chosen].name, "candidates": [e.to_dict() for e in evidence]}


def weigh(name: str, scoring: ScoringConfig, ev: evidence.Evidence, loo: evidence.LeaveOneOut) -> CandidateEvidence:
    """How well ``loo`` (``ev`` scored one way) separates the synthetic defects from the leave-one-out normals."""
    pixel = None if ev.masks is None else pixel_separation(loo.synthetic_maps, ev.masks, loo.normal_maps)
    return CandidateEvidence(name, scoring, image_separation(loo.normal, loo.synthetic), pixel)


def select(detector: Detector, adapter: Adapter, ev: evidence.Evidence) -> Steps[evidence.LeaveOneOut]:
    """Score ``ev`` under every candidate, set the adapter's scoring to the best-separating one, record the choice
    and every candidate's evidence in ``adapter.selection``, and return the chosen one's leave-one-out scores."""
    found, runs = [], []
    for name, cfg in candidates(adapter.scoring, staged=detector.backbone.stage_dims is not None):
        loo = yield from evidence.leave_one_out(detector, replace(adapter, scoring=cfg), ev)
        found.append(weigh(name, cfg, ev, loo))
        runs.append(loo)
    best = choose(found)
    adapter.scoring = found[best].scoring
    adapter.selection = selection_record(found, best)
    return runs[best]
