"""The evidence a product's decision rests on, gathered from its good shots alone.

A registration has only good photos. What it can measure is how a *normal* part scores against a memory that has
never seen it (leave-one-out over the shots and light variants of them) and where a *defect* scores (synthetic
defects made from the shots, with their masks). The features are extracted once (``gather``); any scoring can then
be applied to them (``leave_one_out``), which is what lets a product compare candidate scorings
(``clipshot.scoring_selection``) without another backbone pass. Generators that yield between bounded chunks of
device work (``clipshot.chunked``), so a fit never holds the device for long.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from clipshot.adapter import Adapter
from clipshot.calibration import light_views
from clipshot.chunked import Steps, staged
from clipshot.features import FEATURE_BATCH, Features
from clipshot.memory_branch import MemoryBank
from clipshot.synthetic import AnomalySynthesizer

if TYPE_CHECKING:
    from clipshot.detector import Detector

SYNTHETIC_DEFECTS = 32  # calibration's synthetic defects per fit, spread evenly over the shots


@dataclass
class Evidence:
    """What calibration scores, as features: the shots, their light views (``per_shot`` each, in shot order),
    the synthetic defects with their (N, views * H, W) masks laid out like the maps, and the shot each came from."""

    feats: Features
    views: Features | None
    per_shot: int
    synthetic: Features | None
    masks: torch.Tensor | None
    sources: list[int]


@dataclass
class LeaveOneOut:
    """Scores and frame-resolution maps of the evidence under one scoring (synthetic ones in ``masks`` order)."""

    normal: list[float]
    synthetic: list[float]
    normal_maps: torch.Tensor
    synthetic_maps: torch.Tensor


def gather(detector: Detector, adapter: Adapter, shots: list[Image.Image], feats: Features,
           views: int) -> Steps[Evidence]:
    """Features of the light views and synthetic defects (the shots' own ``feats`` are reused)."""
    dpam = adapter.scoring.dpam
    view_feats = None
    per_batch = max(1, FEATURE_BATCH // adapter.geometry.views_per_image)
    if views:
        all_views = [view for img in shots for view in light_views(img, views)]
        view_feats = yield from staged("embedding light views", len(all_views),
                                       detector.features_steps(all_views, adapter, dpam=dpam), per_chunk=per_batch)
    made, masks, sources = yield from staged("making synthetic defects", len(shots),
                                             synthetic_defects(detector, shots, adapter))
    synth_feats = None
    if len(made):
        synth_feats = yield from staged("embedding synthetic defects", len(made),
                                        unit_features(detector, made, adapter), per_chunk=per_batch)
    return Evidence(feats, view_feats, views, synth_feats, masks if len(made) else None, sources)


def leave_one_out(detector: Detector, adapter: Adapter, ev: Evidence,
                  served: MemoryBank | None = None) -> Steps[LeaveOneOut]:
    """Each shot's evidence (itself, its light views, the synthetic defects made from it) scored under the
    adapter's scoring against a bank of the *other* shots, as a part the memory has never seen; one fold per
    chunk. A single shot is its own bank (only its light views count as normal evidence then).

    ``served``: the bank the adapter serves with. When a coreset thinned it, each fold's bank is that same coreset
    without the held-out shot's rows (not all of the other shots' patches), so the evidence is scored against the
    memory serving scores against, at no second coreset's cost."""
    n = ev.feats.batch_size
    kept = served.kept if served is not None else None
    normal: list[float] = []
    synthetic: list[float] = []
    normal_maps: list[torch.Tensor] = []
    synth_maps: list[torch.Tensor] = []
    order: list[int] = []
    for i in range(n):
        rest = [j for j in range(n) if j != i] or [i]
        keep = None if kept is None or n == 1 else _without(kept, i, ev.feats.patches[0].shape[1])
        bank = detector.memory_bank(ev.feats.select(torch.tensor(rest)), adapter, keep=keep)
        parts = [ev.feats.select(slice(i, i + 1))] if n > 1 or ev.views is None else []
        if ev.views is not None:
            parts.append(ev.views.select(slice(i * ev.per_shot, (i + 1) * ev.per_shot)))
        scores, maps = detector.score_features(Features.cat(parts), adapter, bank)
        normal.extend(scores.tolist())
        normal_maps.append(maps)
        mine = [k for k, src in enumerate(ev.sources) if src == i]
        if ev.synthetic is not None and mine:
            scores, maps = detector.score_features(ev.synthetic.select(torch.tensor(mine)), adapter, bank)
            synthetic.extend(scores.tolist())
            synth_maps.append(maps)
            order.extend(mine)
        yield
    back = np.argsort(order)  # fold order -> the order of ``ev.masks``
    synth = torch.cat(synth_maps)[torch.from_numpy(back)] if synth_maps else torch.zeros(0)
    return LeaveOneOut(normal, [synthetic[k] for k in back], torch.cat(normal_maps), synth)


def _without(kept: list[torch.Tensor], image: int, patches: int) -> list[torch.Tensor]:
    """A coreset's rows (indices into images x ``patches`` rows) without ``image``'s, renumbered for the rows of
    the other images."""
    out = []
    for rows in kept:
        owner = rows // patches
        rest = rows[owner != image]
        out.append(rest - patches * (rest // patches > image).long())
    return out


def synthetic_defects(detector: Detector, shots: list[Image.Image], adapter: Adapter
                      ) -> Steps[tuple[torch.Tensor, torch.Tensor, list[int]]]:
    """(N, views, 3, H, W) unit-range synthetic defects (CutPaste, scar, Perlin) made from the shots in the
    adapter's geometry (one view of each damaged, the rest as they are), their (N, views * H, W) masks, and the
    shot each was made from. A fixed seed: the same shots calibrate the same way. Yields after each shot."""
    geometry = adapter.geometry
    views = geometry.views_per_image
    units = geometry.unit_pixels(shots, detector.backbone.image_size)
    units = units.reshape(len(shots), views, *units.shape[1:])
    height, width = units.shape[-2:]
    per_shot = max(1, math.ceil(SYNTHETIC_DEFECTS / len(shots)))
    generator = torch.Generator().manual_seed(0)
    synthesizer = AnomalySynthesizer(p=1.0)
    made: list[torch.Tensor] = []
    masks: list[torch.Tensor] = []
    sources: list[int] = []
    for i in range(len(shots)):
        for _ in range(per_shot):
            view = int(torch.randint(views, (), generator=generator))
            image, mask, label = synthesizer(units[i, view], list(units[:, view]), generator)
            if label:  # a flat shot can refuse every kind: no defect then, rather than a fake one
                damaged = units[i].clone()
                damaged[view] = image
                full = torch.zeros(views * height, width)
                full[view * height : (view + 1) * height] = mask[0]
                made.append(damaged)
                masks.append(full)
                sources.append(i)
        yield
    if not made:
        return units[:0], torch.zeros(0, views * height, width), sources
    return torch.stack(made), torch.stack(masks), sources


def unit_features(detector: Detector, units: torch.Tensor, adapter: Adapter) -> Steps[Features]:
    """Features of (N, views, 3, H, W) images already cut into the geometry's views, in [0, 1] (no second
    resize), one row per image; yields after each batch."""
    views = units.shape[1]
    flat = units.flatten(0, 1)
    step = max(1, FEATURE_BATCH // views) * views
    parts = []
    for i in range(0, len(flat), step):
        parts.append(detector.features(detector.backbone.normalise(flat[i : i + step]), adapter,
                                       dpam=adapter.scoring.dpam).per_image(views))
        yield
    return Features.cat(parts)
