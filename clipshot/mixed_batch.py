"""One backbone forward for a batch that mixes products, then per-product scoring.

Why: production lines send one image at a time, each camera a different product, so a batch of 16 is typically
16 products. Adapters without LoRA (memory, prompts / text embeddings, the offline backbone) only differ after
the backbone, so they share its forward as is; LoRA products add per-sample low-rank deltas to the same forward
(``clipshot.lora_mixed``). DPAM is a different forward and splits the batch. After the forward each product
scores its own rows, and the map smoothing (upsample + Gaussian, the costly part of scoring on small models)
runs once over all rows that share a sigma. Results equal ``Detector.forward`` per product within float
tolerance (tests/test_core_mixed_batch.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import torch

from clipshot.adapter import Adapter
from clipshot.anomaly_map import pixel_map
from clipshot.features import Features
from clipshot.fusion import fuse_maps, image_score
from clipshot.lora_mixed import mixed_batch
from clipshot.text_branch import text_maps, text_scores

if TYPE_CHECKING:
    from clipshot.detector import Detector

MixedLora = Literal["gather", "group", "split"]


@torch.inference_mode()
def forward_mixed(detector: Detector, pixels: torch.Tensor,
                  adapters: Sequence[Adapter]) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores (B,), maps (B, S, S)) with sample i scored by ``adapters[i]``; one product = ``Detector.forward``."""
    if len(adapters) != pixels.shape[0]:
        raise ValueError(f"{pixels.shape[0]} images but {len(adapters)} adapters")
    unique = {a.uid: a for a in adapters}
    for adapter in unique.values():
        detector.check_compatible(adapter)
    if len(unique) == 1:
        return detector.forward(pixels, adapters[0])  # single product: LoRA folding applies where enabled
    fused: list[torch.Tensor | None] = [None] * len(adapters)
    cls: dict[str, torch.Tensor | None] = {}
    owner: dict[str, list[int]] = {}
    for dpam in (False, True):
        rows = [i for i, a in enumerate(adapters) if a.scoring.dpam == dpam]
        if not rows:
            continue
        feats = _features(detector, pixels[rows], [adapters[i] for i in rows], dpam)
        local: dict[str, list[int]] = {}
        for j, i in enumerate(rows):
            local.setdefault(adapters[i].uid, []).append(j)
        for uid, js in local.items():
            adapter = unique[uid]
            patch_map, cls[uid] = _patch_scores(feats.select(torch.tensor(js, device=feats.patches[0].device)),
                                                adapter)
            owner[uid] = [rows[j] for j in js]
            for k, i in enumerate(owner[uid]):
                fused[i] = patch_map[k]
    maps = torch.empty(len(adapters), detector.backbone.image_size, detector.backbone.image_size,
                       device=fused[0].device)
    for sigma in {a.scoring.sigma for a in unique.values()}:  # smoothing once per sigma, over all its products
        rows = [i for i, a in enumerate(adapters) if a.scoring.sigma == sigma]
        maps[rows] = pixel_map(torch.stack([fused[i] for i in rows]), detector.backbone.image_size, sigma)
    scores = torch.empty(len(adapters), device=maps.device)
    for uid, rows in owner.items():
        scores[rows] = image_score(cls[uid], maps[rows], unique[uid].scoring).to(scores.dtype)
    return scores, maps


def _patch_scores(features: Features, adapter: Adapter) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The fused patch-grid map and the text CLS score: ``Detector.score_features`` before ``pixel_map``."""
    cfg = adapter.scoring
    t_map = None if adapter.text is None else text_maps(features, adapter.text, cfg.temperature)
    m_map = None if adapter.memory is None else adapter.memory.distances(features)
    cls = None
    if adapter.text is not None and features.cls is not None:
        cls = text_scores(features, adapter.text, cfg.temperature)
    return fuse_maps(t_map, m_map, cfg), cls


def _features(detector: Detector, pixels: torch.Tensor, adapters: list[Adapter], dpam: bool) -> Features:
    """Features of a batch whose samples use different adapters, in one forward unless ``split``."""
    loras = {a.uid: a for a in adapters if a.lora is not None}
    if not loras:
        return detector.features(pixels, None, dpam=dpam)
    if len(loras) == 1 and all(a.lora is not None for a in adapters):
        return detector.features(pixels, adapters[0], dpam=dpam)
    resident = detector.resident()  # one walk over the modules, not one per adapter
    for adapter in loras.values():
        if adapter.uid not in resident:
            detector.attach(adapter)
    if detector.mixed_lora == "split":  # one forward per LoRA product, one for the rest, rows put back in order
        parts: list[tuple[list[int], Features]] = []
        for key in [*loras, None]:
            rows = [i for i, a in enumerate(adapters) if (a.uid if a.lora is not None else None) == key]
            if rows:
                parts.append((rows, detector.features(pixels[rows], loras.get(key), dpam=dpam)))
        order = torch.tensor([i for rows, _ in parts for i in rows]).argsort()
        return Features.cat([f for _, f in parts]).select(order.to(parts[0][1].patches[0].device))
    names = [a.uid if a.lora is not None else None for a in adapters]
    with mixed_batch(detector.backbone.visual, names, mode=detector.mixed_lora):  # leaves no LoRA active
        return detector.backbone.extract(pixels, dpam=dpam)
