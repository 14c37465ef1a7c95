"""Augmentations that keep a product image *normal*.

Why: with only 4-16 good shots the adapter overfits to exact pixel positions and lighting. Small shifts
and mild colour jitter mimic real fixture/lighting variation without creating anything a customer would
call a defect. Flips and 90-degree rotations are OFF by default because for many parts (connectors,
printed labels, screws with handedness) a mirrored or rotated part IS an anomaly; enable them only for
products known to be symmetric.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["NormalAugment", "color_jitter", "random_shift"]

# ITU-R BT.601 luma weights: the usual grey conversion, used as the pivot for saturation.
_LUMA = (0.299, 0.587, 0.114)


def _rand(generator: torch.Generator) -> float:
    return float(torch.rand((), generator=generator, device=generator.device))


def _factor(generator: torch.Generator, strength: float) -> float:
    return 1.0 + (2.0 * _rand(generator) - 1.0) * strength


def _grey(image: torch.Tensor) -> torch.Tensor:
    w = image.new_tensor(_LUMA).view(3, 1, 1)
    return (image * w).sum(0, keepdim=True)


def color_jitter(
    image: torch.Tensor,
    generator: torch.Generator,
    brightness: float = 0.05,
    contrast: float = 0.05,
    saturation: float = 0.05,
) -> torch.Tensor:
    """Multiplicative brightness, contrast (about the mean grey) and saturation jitter, clamped to [0, 1].

    Each factor is drawn uniformly from ``[1 - s, 1 + s]``; a strength of 0 draws nothing and leaves the
    image untouched, so disabled jitter does not shift the random stream of later draws either.
    """
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected (3, H, W) image, got {tuple(image.shape)}")
    out = image
    if brightness > 0:
        out = out * _factor(generator, brightness)
    if contrast > 0:
        mean = _grey(out).mean()
        out = (out - mean) * _factor(generator, contrast) + mean
    if saturation > 0:
        grey = _grey(out)
        out = (out - grey) * _factor(generator, saturation) + grey
    return out.clamp(0.0, 1.0)


def random_shift(image: torch.Tensor, generator: torch.Generator, max_shift: float = 0.05) -> torch.Tensor:
    """Translate by up to ``max_shift`` x side (integer pixels), filling borders by reflection.

    Reflection (not zeros) avoids black borders, which the model would otherwise learn as a cue.
    """
    _, h, w = image.shape
    py = min(int(round(max_shift * h)), h - 1)
    px = min(int(round(max_shift * w)), w - 1)
    if py == 0 and px == 0:
        return image.clone()
    dy = int(torch.randint(-py, py + 1, (), generator=generator, device=generator.device))
    dx = int(torch.randint(-px, px + 1, (), generator=generator, device=generator.device))
    padded = F.pad(image[None], (px, px, py, py), mode="reflect")[0]
    return padded[:, py + dy : py + dy + h, px + dx : px + dx + w].clone()


@dataclass(frozen=True)
class NormalAugment:
    """Config + callable for normal-preserving augmentation of one (3, H, W) image in [0, 1]."""

    max_shift: float = 0.05
    flips: bool = False
    rotations: bool = False
    brightness: float = 0.05
    contrast: float = 0.05
    saturation: float = 0.05

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_shift < 0.5:
            raise ValueError("max_shift must be in [0, 0.5)")
        for name in ("brightness", "contrast", "saturation"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1)")

    def __call__(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Return an augmented copy; shape and [0, 1] range are preserved."""
        out = random_shift(image, generator, self.max_shift)
        if self.flips:
            if _rand(generator) < 0.5:
                out = out.flip(-1)
            if _rand(generator) < 0.5:
                out = out.flip(-2)
        if self.rotations:
            # Quarter turns only on square images so the output shape never changes.
            choices = 4 if out.shape[-1] == out.shape[-2] else 2
            k = int(torch.randint(0, choices, (), generator=generator, device=generator.device))
            out = torch.rot90(out, k * (4 // choices), dims=(-2, -1))
        return color_jitter(out, generator, self.brightness, self.contrast, self.saturation)
