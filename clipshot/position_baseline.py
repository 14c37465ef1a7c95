"""A per-position normal level taken from the product's own shots, which its maps may be divided by.

Nearest-neighbour distances are not equally high everywhere on a good part: the frame's borders (the backbone's
padding), a thread or an edge that sits at the same place in every photo, score higher than flat surface even
when nothing is wrong. A map divided by the level the good shots themselves reach at each position reads "how many
times the normal level here", so a defect on a quiet spot counts as much as one on a busy spot.

Whether that helps depends on the product: it lifts a texture whose only position-bound structure is the frame's
border, and hurts a centred object whose background is near zero (dividing by almost nothing there turns noise
into peaks). Which one a customer's product is cannot be known in advance, so with ``position_baseline="auto"``
the product decides at calibration from the same evidence as ``clipshot.scoring_selection`` (its synthetic
defects against its leave-one-out normals), keeping the plain map unless the divided one separates better.

The level is the mean of the shots' leave-one-out maps (each shot against a memory of the others, the evidence
calibration already computes; no extra backbone pass). The evidence for each held-out shot is divided by the
level of the *other* shots only, so a shot is never normalised by its own map; at least ``MIN_SHOTS`` shots are
needed for each of those levels to average two maps or more. Memory-only products: where a text branch is fused
the map mixes text scores whose structure is not the memory's, and the image score needs the text CLS score,
which the evidence does not keep.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from clipshot.fusion import image_score
from clipshot.scoring_selection import choose, weigh

if TYPE_CHECKING:
    from clipshot.adapter import Adapter
    from clipshot.calibration_evidence import Evidence, LeaveOneOut

MIN_SHOTS = 3
FLOOR = 0.01  # the level is kept at or above this fraction of its own mean: a guard against division by ~0 only
RULE = ("divide the map by the shots' leave-one-out mean map when that separates the product's synthetic defects "
        "from its leave-one-out normals better (mean of image and pixel AUROC); ties keep the plain map")


def level(maps: torch.Tensor) -> torch.Tensor:
    """The (views * H, W) normal level of (N, views * H, W) good maps: their mean, floored (``FLOOR``)."""
    mean = maps.float().mean(0)
    return mean.clamp_min(FLOOR * float(mean.mean().clamp_min(torch.finfo(torch.float32).tiny)))


def apply(maps: torch.Tensor, baseline: torch.Tensor) -> torch.Tensor:
    """(B, views * H, W) maps divided by the level at each position."""
    if baseline.shape != maps.shape[1:]:
        raise ValueError(f"position baseline {list(baseline.shape)} does not match maps {list(maps.shape[1:])}: "
                         "the bundle was fitted at another frame")
    return maps / baseline.to(device=maps.device, dtype=maps.dtype)


def unavailable(adapter: Adapter, shots: int) -> str | None:
    """Why the product cannot use a position baseline, or None when it can."""
    if adapter.text is not None:
        return "the text branch is fused into the map"
    if adapter.memory is None:
        return "no memory branch"
    if shots < MIN_SHOTS:
        return f"{shots} shot(s): a level needs at least {MIN_SHOTS} (two maps besides the held-out one)"
    return None


def decide(adapter: Adapter, ev: Evidence, loo: LeaveOneOut) -> LeaveOneOut:
    """Set ``adapter.baseline`` (the served level or None) and ``adapter.baseline_choice`` (the evidence) by
    ``adapter.scoring.position_baseline``; return the leave-one-out evidence as the chosen maps score it.

    ``loo`` must be the plain maps of ``ev`` under the adapter's scoring (``calibration_evidence.leave_one_out``
    with no baseline set)."""
    mode = adapter.scoring.position_baseline
    adapter.baseline, adapter.baseline_choice = None, None
    if mode == "off":
        return loo
    shots = ev.feats.batch_size
    reason = unavailable(adapter, shots)
    if reason is not None:
        adapter.baseline_choice = {"rule": RULE, "mode": mode, "chosen": "plain", "reason": reason}
        return loo
    per_fold = loo.normal_maps.shape[0] // shots
    folds = loo.normal_maps.reshape(shots, per_fold, *loo.normal_maps.shape[1:])
    own = folds[:, 0]  # each shot's own map against the other shots (light views follow it)
    others = torch.stack([level(own[[j for j in range(shots) if j != i]]) for i in range(shots)])
    normal_maps = (folds / others[:, None]).flatten(0, 1)
    synthetic_maps = loo.synthetic_maps  # empty when no synthetic defect came out
    if ev.sources:
        synthetic_maps = synthetic_maps / others[torch.tensor(ev.sources, dtype=torch.long)]
    divided = replace(loo, normal_maps=normal_maps, synthetic_maps=synthetic_maps,
                      normal=image_score(None, normal_maps, adapter.scoring).tolist(),
                      synthetic=image_score(None, synthetic_maps, adapter.scoring).tolist() if ev.sources else [])
    weighed = [weigh("plain", adapter.scoring, ev, loo), weigh("divided", adapter.scoring, ev, divided)]
    use = mode == "on" or choose(weighed) == 1  # ties keep the plain map, the earlier candidate
    adapter.baseline = level(own) if use else None
    adapter.baseline_choice = {"rule": RULE, "mode": mode, "chosen": "divided" if use else "plain",
                               "plain": weighed[0].to_dict(), "divided": weighed[1].to_dict()}
    return divided if use else loo
