"""Backbone spec strings: one string names the architecture and where its weights come from."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_BACKBONE = "open_clip:ViT-B-16-plus-240:laion400m_e32"
TINY_CLIP = "test:tiny-clip"
EFFICIENTNET_LITE0 = "imagenet:efficientnet-lite0"
EFFICIENTNET_LITE1 = "imagenet:efficientnet-lite1"
EFFICIENTNET_LITE2 = "imagenet:efficientnet-lite2"
EFFICIENTNETS = (EFFICIENTNET_LITE0, EFFICIENTNET_LITE1, EFFICIENTNET_LITE2)

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


class BackboneSpecError(ValueError):
    """Raised for a spec string that names no known backbone."""


@dataclass(frozen=True)
class BackboneSpec:
    """Parsed form of ``family:arch[:weights]``; ``weights`` is a tag, a local path, or ``None`` (random init)."""

    family: str
    arch: str
    weights: str | None

    @property
    def weights_is_path(self) -> bool:
        return self.weights is not None and (
            self.weights.endswith(WEIGHT_SUFFIXES) or "/" in self.weights or Path(self.weights).exists()
        )

    def __str__(self) -> str:
        return f"{self.family}:{self.arch}" + (f":{self.weights}" if self.weights is not None else "")


def parse_spec(spec: str) -> BackboneSpec:
    """Parse and validate a spec; the error lists every accepted form because users type these by hand."""
    help_text = (
        f"expected one of 'open_clip:<arch>:<pretrained tag or path to .safetensors/.pt>', "
        f"'open_clip:<arch>:random' (random init, for speed tests only), {', '.join(repr(e) for e in EFFICIENTNETS)}, "
        f"'{TINY_CLIP}', 'timm:<vit arch>:<path to .safetensors/.pth>' (DINOv2/DINOv3, memory branch only)"
    )
    if not isinstance(spec, str) or not spec.strip():
        raise BackboneSpecError(f"empty backbone spec; {help_text}")
    spec = spec.strip()
    if spec == TINY_CLIP:
        return BackboneSpec("test", "tiny-clip", None)
    if spec in EFFICIENTNETS:
        return BackboneSpec("imagenet", spec.partition(":")[2], "bundled")
    family, _, rest = spec.partition(":")
    if family not in ("open_clip", "timm") or not rest:
        raise BackboneSpecError(f"unknown backbone spec {spec!r}; {help_text}")
    arch, _, weights = rest.partition(":")
    if not arch:
        raise BackboneSpecError(f"backbone spec {spec!r} names no architecture; {help_text}")
    if not weights and family == "timm":
        raise BackboneSpecError(f"backbone spec {spec!r} names no weights; append the local weights file "
                                f"('timm:{arch}:/path/to/model.safetensors'); {help_text}")
    if not weights:
        raise BackboneSpecError(
            f"backbone spec {spec!r} names no weights; append a pretrained tag (e.g. "
            f"'open_clip:ViT-B-16-plus-240:laion400m_e32') or a local checkpoint path; {help_text}"
        )
    return BackboneSpec(family, arch, None if weights == "random" else weights)
