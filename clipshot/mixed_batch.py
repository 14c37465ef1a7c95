"""One backbone forward for a batch that mixes products; the scoring stays the detector's.

Why: production lines send one image at a time, each camera a different product, so a batch of 16 is typically
16 products. Adapters without LoRA (memory, prompts / text embeddings, the offline backbone) only differ after
the backbone, so they share its forward as is; LoRA products add per-sample low-rank deltas to the same forward
(``clipshot.lora_mixed``). DPAM is a different forward and splits the batch. This module only produces the
features, one row per image in the batch's order; ``Detector.forward_mixed`` then scores them through
``Detector.score_rows``, the same function a lone product's ``Detector.forward`` ends in, so the two paths cannot
drift apart. It knows the detector only through ``FeatureSource`` (no import of ``clipshot.detector``).

Every image of a mixed batch must have the same pixel shape: the same model frame and the same number of views
(tiles). The service's batcher groups its batches that way; ``Detector.forward_mixed`` refuses anything else.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal, Protocol, cast

import torch

from clipshot.adapter import Adapter
from clipshot.backbone import Backbone
from clipshot.features import Features
from clipshot.lora_mixed import mixed_batch
from clipshot.runtimes import FeatureRuntime

if TYPE_CHECKING:
    from clipshot.backbone.clip import ClipBackbone

MixedLora = Literal["gather", "group", "split"]


class FeatureSource(Protocol):
    """What the mixed forward needs of a detector: its backbone, LoRA residency and per-adapter features."""

    backbone: Backbone
    mixed_lora: MixedLora
    runtime: FeatureRuntime | None

    def features(self, pixels: torch.Tensor, adapter: Adapter | None, *, dpam: bool = False) -> Features: ...

    def resident(self) -> set[str]: ...

    def attach(self, adapter: Adapter) -> None: ...


def mixed_features(source: FeatureSource, pixels: torch.Tensor, adapters: Sequence[Adapter],
                   views: int) -> Features:
    """Features of ``pixels`` ((B * views, 3, H, W), one image's views consecutive), one row per image, row i
    through ``adapters[i]``'s LoRA and DPAM choice; as few forwards as DPAM and ``mixed_lora`` allow."""
    parts: list[tuple[list[int], Features]] = []
    for dpam in (False, True):
        rows = [i for i, a in enumerate(adapters) if a.scoring.dpam == dpam]
        if not rows:
            continue
        if len(rows) < len(adapters):
            index = torch.tensor([i * views + v for i in rows for v in range(views)], device=pixels.device)
            part = pixels.index_select(0, index)
        else:
            part = pixels
        per_view = [adapters[i] for i in rows for _ in range(views)]
        parts.append((rows, _features(source, part, per_view, dpam).per_image(views)))
    if len(parts) == 1:
        return parts[0][1]
    return _in_order(parts)


def _in_order(parts: list[tuple[list[int], Features]]) -> Features:
    """Features of several row subsets put back in the batch's row order."""
    order = torch.tensor([i for rows, _ in parts for i in rows]).argsort()
    return Features.cat([f for _, f in parts]).select(order.to(parts[0][1].patches[0].device))


def _features(source: FeatureSource, pixels: torch.Tensor, adapters: list[Adapter], dpam: bool) -> Features:
    """Features of a batch whose samples use different adapters, in one forward unless ``split``."""
    if source.runtime is not None:
        return _per_graph(source, source.runtime, pixels, adapters, dpam)
    loras: dict[str | None, Adapter] = {a.uid: a for a in adapters if a.lora is not None}
    if not loras:
        return source.features(pixels, None, dpam=dpam)
    if len(loras) == 1 and all(a.lora is not None for a in adapters):
        return source.features(pixels, adapters[0], dpam=dpam)
    resident = source.resident()  # one walk over the modules, not one per adapter
    for adapter in loras.values():
        if adapter.uid not in resident:
            source.attach(adapter)
    if source.mixed_lora == "split":  # one forward per LoRA product, one for the rest
        split: dict[str | None, tuple[Adapter | None, list[int]]] = {}
        for i, adapter in enumerate(adapters):
            key = adapter.uid if adapter.lora is not None else None
            split.setdefault(key, (loras.get(key), []))[1].append(i)
        return _grouped(source, pixels, split, dpam)
    names = [a.uid if a.lora is not None else None for a in adapters]
    backbone = cast("ClipBackbone", source.backbone)  # the LoRAs are resident now: only CLIP backbones take them
    with mixed_batch(backbone.visual, names, mode=source.mixed_lora):  # leaves no LoRA active
        return source.backbone.extract(pixels, dpam=dpam)


def _per_graph(source: FeatureSource, runtime: FeatureRuntime, pixels: torch.Tensor, adapters: list[Adapter],
               dpam: bool) -> Features:
    """One runtime forward per graph: rows share a forward only when their LoRA digest and int8 calibration are
    the same (``FeatureRuntime.graph_identity``), so no row runs through another product's graph."""
    groups: dict[tuple[str | None, str | None], tuple[Adapter | None, list[int]]] = {}
    for i, adapter in enumerate(adapters):
        groups.setdefault(runtime.graph_identity(adapter), (adapter, []))[1].append(i)
    return _grouped(source, pixels, groups, dpam)


def _grouped(source: FeatureSource, pixels: torch.Tensor, groups: dict[Any, tuple[Adapter | None, list[int]]],
             dpam: bool) -> Features:
    """One forward per group (its adapter, its rows), the rows put back in the batch's order; a lone group is one
    forward over the whole batch, uncopied."""
    if len(groups) == 1:
        ((adapter, _),) = groups.values()
        return source.features(pixels, adapter, dpam=dpam)
    return _in_order([(rows, source.features(pixels[rows], adapter, dpam=dpam)) for adapter, rows in groups.values()])
