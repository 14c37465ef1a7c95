"""2-D Perlin and fractal noise.

Why: synthetic anomalies need irregular, blob-shaped masks and organic-looking textures that are
not tied to any external texture dataset. Perlin noise gives smooth, band-limited random fields whose
blob size is controlled by the lattice resolution, so one generator covers both needs.

All randomness comes from the caller's generator (``torch.Generator`` or ``numpy.random.Generator``)
so a training run is reproducible from one seed.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["AnyGenerator", "fractal_noise", "perlin_mask", "perlin_noise", "uniform"]

AnyGenerator = torch.Generator | np.random.Generator

# Unit-gradient 2-D Perlin noise lies in [-sqrt(1/2), sqrt(1/2)]; scaling by sqrt(2) maps it to [-1, 1]
# so thresholds mean the same thing regardless of resolution.
_PERLIN_SCALE = math.sqrt(2.0)


def uniform(shape: tuple[int, ...], generator: AnyGenerator) -> torch.Tensor:
    """Uniform [0, 1) float32 CPU tensor from either generator kind, so callers may seed with either."""
    if isinstance(generator, np.random.Generator):
        return torch.from_numpy(generator.random(shape, dtype=np.float32))
    return torch.rand(shape, generator=generator, device=generator.device).cpu()


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    ry, rx = (value, value) if isinstance(value, int) else value
    if ry < 1 or rx < 1:
        raise ValueError(f"resolution must be >= 1, got {value!r}")
    return int(ry), int(rx)


def _fade(t: torch.Tensor) -> torch.Tensor:
    # Quintic fade has zero first and second derivative at cell borders -> no visible lattice seams.
    return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)


def perlin_noise(
    shape: tuple[int, int],
    res: int | tuple[int, int],
    generator: AnyGenerator,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """One octave of Perlin noise, shape (H, W), values in [-1, 1].

    ``res`` is the number of lattice cells along (y, x): larger -> smaller blobs. H and W need not be
    multiples of ``res`` because sample positions are computed in continuous lattice coordinates.
    """
    h, w = shape
    ry, rx = _pair(res)
    angles = uniform((ry + 1, rx + 1), generator) * (2.0 * math.pi)
    gy, gx = torch.sin(angles), torch.cos(angles)

    # Pixel centres mapped into lattice coordinates [0, res).
    ys = (torch.arange(h, dtype=torch.float32) + 0.5) * (ry / h)
    xs = (torch.arange(w, dtype=torch.float32) + 0.5) * (rx / w)
    iy = ys.floor().long().clamp(max=ry - 1)
    ix = xs.floor().long().clamp(max=rx - 1)
    fy = (ys - iy)[:, None]
    fx = (xs - ix)[None, :]
    iy, ix = iy[:, None], ix[None, :]

    def corner(dy: int, dx: int) -> torch.Tensor:
        # Dot product of the corner gradient with the offset from that corner.
        return gy[iy + dy, ix + dx] * (fy - dy) + gx[iy + dy, ix + dx] * (fx - dx)

    u, v = _fade(fy), _fade(fx)
    top = torch.lerp(corner(0, 0), corner(0, 1), v)
    bottom = torch.lerp(corner(1, 0), corner(1, 1), v)
    noise = torch.lerp(top, bottom, u) * _PERLIN_SCALE
    noise = noise.clamp_(-1.0, 1.0)
    return noise if device is None else noise.to(device)


def fractal_noise(
    shape: tuple[int, int],
    res: int | tuple[int, int],
    generator: AnyGenerator,
    octaves: int = 1,
    persistence: float = 0.5,
    lacunarity: float = 2.0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Sum of Perlin octaves (fBm), shape (H, W), values in [-1, 1].

    Why: extra octaves add fine detail on top of the coarse blobs, which makes masks with ragged,
    defect-like borders and textures that look less synthetic.
    """
    if octaves < 1:
        raise ValueError("octaves must be >= 1")
    ry, rx = _pair(res)
    total = torch.zeros(shape, dtype=torch.float32)
    amp, norm = 1.0, 0.0
    for o in range(octaves):
        scale = lacunarity**o
        octave_res = (max(1, round(ry * scale)), max(1, round(rx * scale)))
        total += amp * perlin_noise(shape, octave_res, generator)
        norm += amp
        amp *= persistence
    total /= norm
    return total if device is None else total.to(device)


def perlin_mask(
    shape: tuple[int, int],
    generator: AnyGenerator,
    scale_exp: tuple[int, int] = (0, 5),
    threshold: float = 0.5,
    octaves: int = 1,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Boolean blob mask (H, W): thresholded Perlin noise with a random per-axis resolution.

    Resolution per axis is ``2**k`` with k drawn from ``scale_exp`` (inclusive), so blobs range from
    image-sized to a few pixels and can be elongated; the mask may be empty (callers retry).
    """
    lo, hi = scale_exp
    if not 0 <= lo <= hi:
        raise ValueError(f"bad scale_exp {scale_exp!r}")
    k = (uniform((2,), generator) * (hi - lo + 1)).floor().long().clamp(max=hi - lo) + lo
    res = (2 ** int(k[0]), 2 ** int(k[1]))
    noise = fractal_noise(shape, res, generator, octaves=octaves)
    mask = noise > threshold
    return mask if device is None else mask.to(device)
