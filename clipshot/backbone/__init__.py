"""One entry point, ``load_backbone(spec)``, for every backbone clipshot can run on."""

from __future__ import annotations

from collections.abc import Sequence

from clipshot.backbone.base import PRECISION_CHOICES, Backbone, resolve_device, resolve_precision
from clipshot.backbone.clip import BackboneLoadError, ClipBackbone, create_clip_model
from clipshot.backbone.efficientnet import EfficientNetBackbone
from clipshot.backbone.spec import (
    DEFAULT_BACKBONE,
    EFFICIENTNET_LITE0,
    TINY_CLIP,
    BackboneSpec,
    BackboneSpecError,
    parse_spec,
)
from clipshot.backbone.vit import TimmViTBackbone

__all__ = [
    "Backbone", "BackboneLoadError", "BackboneSpec", "BackboneSpecError", "ClipBackbone", "DEFAULT_BACKBONE",
    "EFFICIENTNET_LITE0", "EfficientNetBackbone", "PRECISION_CHOICES", "TINY_CLIP", "TimmViTBackbone", "load_backbone",
    "parse_spec", "resolve_device", "resolve_precision",
]


def load_backbone(
    spec: str,
    *,
    device: str = "cpu",
    precision: str = "auto",
    image_size: int | None = None,
    layers: Sequence[int] | None = None,
    dpam_layers: Sequence[int] | None = None,
    quick_gelu: bool | None = None,
) -> Backbone:
    """Build a frozen backbone from a spec string (see ``parse_spec`` for the accepted forms).

    ``precision``: ``auto`` (bf16 on GPUs that have it, fp32 on CPU), ``fp32``, ``fp16`` or ``bf16``.
    """
    parsed = parse_spec(spec)
    if parsed.family == "imagenet":
        if layers or dpam_layers:
            raise ValueError(f"{parsed} has fixed feature layers; do not pass layers/dpam_layers")
        return EfficientNetBackbone(variant=parsed.arch, device=device, precision=precision, image_size=image_size)
    if parsed.family == "timm":
        if dpam_layers or quick_gelu is not None:
            raise ValueError(f"{parsed} is a ViT without a CLIP head; do not pass dpam_layers/quick_gelu")
        return TimmViTBackbone.load(parsed, device=device, precision=precision, image_size=image_size, layers=layers)
    return ClipBackbone(
        create_clip_model(parsed, image_size, quick_gelu), spec=str(parsed),
        device=device, precision=precision, layers=layers, dpam_layers=dpam_layers,
    )
