"""Synthetic anomalies with exact pixel masks, built only from the product's own good shots.

Why: a new product is registered from a handful of GOOD photos, so there are no real defects to learn
from. We fabricate plausible local defects (misplaced patches, scratches, stains) from the shots
themselves - no external texture dataset, so nothing leaks in that the product could never show.

Invariant every generator here keeps: ``mask == 1`` exactly where the output differs from the input
(by more than ``min_delta``), and the output equals the input bit-for-bit everywhere else. Pixels that a
paste or blend happened not to change visibly are restored and dropped from the mask, so the pixel loss
is never asked to flag a region that looks exactly normal.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from clipshot.synthetic.augment import color_jitter
from clipshot.synthetic.perlin import fractal_noise, perlin_mask

__all__ = ["KINDS", "AnomalySynthesizer", "cutpaste", "cutpaste_scar", "perlin_blend"]

KINDS = ("cutpaste", "scar", "perlin")
# One 8-bit quantisation step: a smaller change disappears when the image is saved/loaded as uint8,
# so it must not count as a defect.
DEFAULT_MIN_DELTA = 1.0 / 255.0


def _u(g: torch.Generator, lo: float = 0.0, hi: float = 1.0) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g, device=g.device))


def _randint(g: torch.Generator, lo: int, hi: int) -> int:
    """Integer in [lo, hi] inclusive."""
    return lo if hi <= lo else int(torch.randint(lo, hi + 1, (), generator=g, device=g.device))


def _pick_source(
    image: torch.Tensor, sources: Sequence[torch.Tensor] | None, g: torch.Generator, p_other: float
) -> torch.Tensor:
    """Another shot with probability ``p_other`` (when given), else the image itself."""
    if sources and _u(g) < p_other:
        return sources[_randint(g, 0, len(sources) - 1)].to(image)
    return image


def _finalize(
    image: torch.Tensor, out: torch.Tensor, region: torch.Tensor, min_delta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Restore pixels that did not change by more than ``min_delta`` and return (out, float mask)."""
    changed = region & ((out - image).abs().amax(0) > min_delta)
    out = torch.where(changed, out, image)
    return out, changed[None].to(image.dtype)


def _paste_rotated(
    image: torch.Tensor,
    patch: torch.Tensor,
    angle: float,
    g: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Paste ``patch`` (3, h, w) rotated by ``angle`` radians at a random spot (nearest sampling).

    Every destination pixel is mapped back into the patch frame, so the pasted region is exactly the
    set of pixels whose back-mapped position falls inside the patch - no interpolated halo whose
    membership in the mask would be ambiguous.
    """
    _, height, width = image.shape
    _, h, w = patch.shape
    c, s = math.cos(angle), math.sin(angle)
    bh, bw = abs(h * c) + abs(w * s), abs(h * s) + abs(w * c)  # rotated bounding box
    # Place the bounding box fully inside when it fits; otherwise let it overhang (clipped).
    cy = _u(g, bh / 2, height - bh / 2) if bh < height else _u(g, 0, height)
    cx = _u(g, bw / 2, width - bw / 2) if bw < width else _u(g, 0, width)
    if angle == 0.0:  # integer-aligned so an unrotated patch lands as an exact h x w rectangle
        cy, cx = math.floor(cy - h / 2) + h / 2, math.floor(cx - w / 2) + w / 2
    yy = (torch.arange(height, device=image.device, dtype=torch.float32) + 0.5 - cy)[:, None]
    xx = (torch.arange(width, device=image.device, dtype=torch.float32) + 0.5 - cx)[None, :]
    py = torch.floor(c * yy + s * xx + h / 2).long()
    px = torch.floor(-s * yy + c * xx + w / 2).long()
    inside = (py >= 0) & (py < h) & (px >= 0) & (px < w)
    out = image.clone()
    out[:, inside] = patch[:, py[inside], px[inside]]
    return out, inside


def _cut(source: torch.Tensor, h: int, w: int, g: torch.Generator) -> torch.Tensor:
    _, sh, sw = source.shape
    h, w = min(h, sh), min(w, sw)
    y, x = _randint(g, 0, sh - h), _randint(g, 0, sw - w)
    return source[:, y : y + h, x : x + w]


def cutpaste(
    image: torch.Tensor,
    generator: torch.Generator,
    source: torch.Tensor | None = None,
    area: tuple[float, float] = (0.02, 0.15),
    aspect: tuple[float, float] = (0.3, 3.3),
    jitter: float = 0.1,
    min_delta: float = DEFAULT_MIN_DELTA,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CutPaste: a colour-jittered rectangle from ``source`` (default: the image) pasted elsewhere.

    Why: teaches the model that locally *misplaced* but otherwise realistic content is anomalous.
    Area is a fraction of the image; aspect ratio is drawn log-uniformly so tall and wide are equally likely.
    """
    source = image if source is None else source.to(image)
    _, height, width = image.shape
    a = _u(generator, *area) * height * width
    r = math.exp(_u(generator, math.log(aspect[0]), math.log(aspect[1])))
    h = max(1, min(height, round(math.sqrt(a * r))))
    w = max(1, min(width, round(math.sqrt(a / r))))
    patch = color_jitter(_cut(source, h, w, generator), generator, jitter, jitter, jitter)
    out, region = _paste_rotated(image, patch, 0.0, generator)
    return _finalize(image, out, region, min_delta)


def cutpaste_scar(
    image: torch.Tensor,
    generator: torch.Generator,
    source: torch.Tensor | None = None,
    width: tuple[float, float] = (0.01, 0.06),
    length: tuple[float, float] = (0.1, 0.35),
    jitter: float = 0.1,
    min_delta: float = DEFAULT_MIN_DELTA,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CutPaste-scar: a thin, long patch at a random angle - mimics scratches and cracks.

    Width/length are fractions of the shorter image side (width at least 2 px so it stays visible).
    """
    source = image if source is None else source.to(image)
    side = min(image.shape[-2:])
    w = max(2, round(_u(generator, *width) * side))
    h = max(w + 1, round(_u(generator, *length) * side))
    patch = color_jitter(_cut(source, h, w, generator), generator, jitter, jitter, jitter)
    angle = _u(generator, -math.pi / 2, math.pi / 2)
    out, region = _paste_rotated(image, patch, angle, generator)
    return _finalize(image, out, region, min_delta)


def _shot_texture(shot: torch.Tensor, size: tuple[int, int], g: torch.Generator) -> torch.Tensor:
    """A random crop of a shot, randomly flipped / quarter-turned, resized to ``size``.

    Why: the flipped/rotated crop has the product's own colours and grain but is spatially inconsistent
    with the location it is blended into - exactly what a foreign-material defect looks like.
    """
    _, sh, sw = shot.shape
    crop = _cut(shot, max(1, round(sh * _u(g, 0.25, 1.0))), max(1, round(sw * _u(g, 0.25, 1.0))), g)
    if _u(g) < 0.5:
        crop = crop.flip(-1)
    if _u(g) < 0.5:
        crop = crop.flip(-2)
    crop = torch.rot90(crop, _randint(g, 0, 3), dims=(-2, -1))
    tex = F.interpolate(crop[None], size=size, mode="bilinear", align_corners=False)[0]
    return tex.clamp(0.0, 1.0)


def _noise_texture(size: tuple[int, int], g: torch.Generator, device: torch.device) -> torch.Tensor:
    """Coloured fractal noise: one fBm field per channel, each stretched to the full [0, 1] range."""
    chans = []
    for _ in range(3):
        res = 2 ** _randint(g, 1, 4)
        n = fractal_noise(size, res, g, octaves=_randint(g, 2, 4))
        chans.append((n - n.min()) / (n.max() - n.min()).clamp_min(1e-6))
    return torch.stack(chans).to(device)


def perlin_blend(
    image: torch.Tensor,
    generator: torch.Generator,
    sources: Sequence[torch.Tensor] | None = None,
    beta: tuple[float, float] = (0.2, 1.0),
    p_procedural: float = 0.5,
    threshold: float = 0.5,
    scale_exp: tuple[int, int] = (0, 5),
    min_delta: float = DEFAULT_MIN_DELTA,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DRAEM-style blend ``(1 - b) * img + b * texture`` inside a thresholded-Perlin blob mask.

    The texture is procedural coloured noise with probability ``p_procedural``, else a transformed
    crop of one of ``sources`` (default: the image itself). ``b`` in ``beta`` varies from faint stains
    to fully opaque blobs. The result is a convex combination, so it stays in [0, 1].
    """
    size = (image.shape[-2], image.shape[-1])
    region = perlin_mask(size, generator, scale_exp=scale_exp, threshold=threshold, device=image.device)
    if _u(generator) < p_procedural:
        texture = _noise_texture(size, generator, image.device).to(image.dtype)
    else:
        pool = list(sources) if sources else [image]
        texture = _shot_texture(pool[_randint(generator, 0, len(pool) - 1)].to(image), size, generator)
    b = _u(generator, *beta)
    out = torch.where(region, (1.0 - b) * image + b * texture, image)
    return _finalize(image, out, region, min_delta)


@dataclass
class AnomalySynthesizer:
    """Turn a good shot into (image, mask, label) training triples.

    With probability ``1 - p`` the image is returned unchanged (mask all zero, label 0), so one
    synthesizer feeds both classes. Otherwise a kind is drawn uniformly from ``kinds``; if it yields
    fewer than ``min_pixels`` altered pixels it is retried ``max_tries`` times, then the remaining kinds
    are tried in turn. If nothing works (e.g. a perfectly flat image with jitter off) the image is
    returned unchanged with label 0 rather than a label that contradicts the pixels.
    """

    p: float = 0.5
    kinds: tuple[str, ...] = KINDS
    p_other_source: float = 0.5
    p_procedural: float = 0.5
    jitter: float = 0.1
    min_delta: float = DEFAULT_MIN_DELTA
    min_pixels: int = 16
    max_tries: int = 4

    def __post_init__(self) -> None:
        if not 0.0 <= self.p <= 1.0:
            raise ValueError("p must be in [0, 1]")
        if not self.kinds or any(k not in KINDS for k in self.kinds):
            raise ValueError(f"kinds must be a non-empty subset of {KINDS}, got {self.kinds!r}")
        if self.min_delta < 1e-6:
            raise ValueError("min_delta must be >= 1e-6 so float noise never counts as a change")
        if self.min_pixels < 1 or self.max_tries < 1:
            raise ValueError("min_pixels and max_tries must be >= 1")

    def _once(
        self, kind: str, image: torch.Tensor, sources: Sequence[torch.Tensor] | None, g: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if kind == "perlin":
            return perlin_blend(image, g, sources, p_procedural=self.p_procedural, min_delta=self.min_delta)
        src = _pick_source(image, sources, g, self.p_other_source)
        fn = cutpaste if kind == "cutpaste" else cutpaste_scar
        return fn(image, g, src, jitter=self.jitter, min_delta=self.min_delta)

    def __call__(
        self,
        image: torch.Tensor,
        sources: Sequence[torch.Tensor] | None,
        generator: torch.Generator,
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Return ``(image_out (3,H,W), mask (1,H,W) in {0,1}, label)``; deterministic given ``generator``."""
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"expected (3, H, W) image, got {tuple(image.shape)}")
        if not image.is_floating_point() or image.min() < 0 or image.max() > 1:
            raise ValueError("image must be floating point in [0, 1]")
        empty = torch.zeros_like(image[:1])
        if _u(generator) >= self.p:
            return image.clone(), empty, 0
        start = _randint(generator, 0, len(self.kinds) - 1)
        for kind in self.kinds[start:] + self.kinds[:start]:
            for _ in range(self.max_tries):
                out, mask = self._once(kind, image, sources, generator)
                if mask.sum() >= self.min_pixels:
                    return out, mask, 1
        return image.clone(), empty, 0
