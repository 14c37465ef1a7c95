"""Tests for synthetic anomalies, Perlin noise and normal-preserving augmentation.

The central contract is exactness: ``mask == (|out - in| > 1e-6)`` pixel for pixel. 1e-6 is far below
one 8-bit grey level (~3.9e-3), so any pixel the generator touched visibly must be in the mask and any
pixel left in the mask must really have changed.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clipshot.synthetic.anomalies import KINDS, AnomalySynthesizer, cutpaste, cutpaste_scar, perlin_blend
from clipshot.synthetic.augment import NormalAugment, color_jitter, random_shift
from clipshot.synthetic.perlin import fractal_noise, perlin_mask, perlin_noise

TOL = 1e-6


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def changed(out: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
    return (out - img).abs().amax(0) > TOL


def half_flat_image(size: int = 48) -> torch.Tensor:
    """Random texture on the left, one flat grey on the right.

    Why: pastes/blends that land on the flat half from the flat half change nothing, which is exactly
    the case where a naive implementation would mark unchanged pixels.
    """
    img = torch.full((3, size, size), 0.5)
    img[:, :, : size // 2] = torch.rand(3, size, size // 2, generator=gen(123))
    return img


def assert_exact(out: torch.Tensor, mask: torch.Tensor, img: torch.Tensor) -> None:
    assert out.shape == img.shape and mask.shape == (1, *img.shape[1:])
    assert mask.dtype.is_floating_point
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(mask[0].bool(), changed(out, img))
    assert out.min() >= 0.0 and out.max() <= 1.0


# ---------------------------------------------------------------- anomalies


@pytest.mark.parametrize("kind", KINDS)
def test_synthesizer_mask_marks_exactly_altered_pixels(kind: str) -> None:
    img = half_flat_image()
    sources = [torch.rand(3, 40, 56, generator=gen(7)), img.flip(-1)]
    synth = AnomalySynthesizer(p=1.0, kinds=(kind,), jitter=0.0)
    g = gen(0)
    for _ in range(25):
        out, mask, label = synth(img, sources, g)
        assert_exact(out, mask, img)
        assert label == 1 and mask.sum() >= synth.min_pixels


@pytest.mark.parametrize("fn", [cutpaste, cutpaste_scar, perlin_blend])
def test_generators_drop_pixels_that_did_not_change(fn) -> None:
    # Flat image with one small random square and no colour jitter: most pastes copy grey onto grey.
    img = torch.full((3, 40, 40), 0.25)
    img[:, 5:15, 5:15] = torch.rand(3, 10, 10, generator=gen(1))
    g = gen(2)
    kwargs = {} if fn is perlin_blend else {"jitter": 0.0}
    for _ in range(30):
        out, mask = fn(img, g, **kwargs)
        assert_exact(out, mask, img)


def test_sub_quantisation_changes_are_reverted_not_marked() -> None:
    # Faint sensor noise of amplitude 1e-3 < 1/255: pasting such pixels elsewhere changes them by more
    # than 1e-6 but by less than one grey level, so they must be restored bit-for-bit and left unmarked.
    img = 0.5 + 1e-3 * torch.rand(3, 32, 32, generator=gen(15))
    g = gen(16)
    for fn in (cutpaste, cutpaste_scar):
        for _ in range(10):
            out, mask = fn(img, g, jitter=0.0)
            assert torch.equal(out, img) and not mask.any()


def test_cutpaste_region_is_an_axis_aligned_rectangle() -> None:
    # On white noise every pasted pixel differs, so the mask must fill its own bounding box.
    img = torch.rand(3, 64, 64, generator=gen(3))
    g = gen(4)
    for _ in range(10):
        _, mask = cutpaste(img, g)
        ys, xs = torch.nonzero(mask[0], as_tuple=True)
        box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
        assert mask.sum() == box


def test_scar_is_thin() -> None:
    # Width <= 6% of the side and length >= 10%: the mask must be much smaller than a CutPaste patch.
    img = torch.rand(3, 64, 64, generator=gen(5))
    g = gen(6)
    areas = [cutpaste_scar(img, g)[1].sum().item() for _ in range(20)]
    assert 0 < max(areas) <= 0.06 * 64 * 0.35 * 64 * 1.5  # 1.5: nearest-sampling rotation slack


def test_p_zero_returns_input_bit_for_bit() -> None:
    img = torch.rand(3, 32, 32, generator=gen(8))
    synth = AnomalySynthesizer(p=0.0)
    g = gen(9)
    for _ in range(10):
        out, mask, label = synth(img, [img], g)
        assert torch.equal(out, img) and out is not img
        assert label == 0 and mask.shape == (1, 32, 32) and not mask.any()


def test_label_rate_follows_p() -> None:
    # 200 Bernoulli(0.5) draws: sd = 0.035, so +-0.15 is a ~4-sigma bar; p ignored would give 0 or 1.
    synth = AnomalySynthesizer(p=0.5, kinds=("cutpaste",))
    img = torch.rand(3, 16, 16, generator=gen(10))
    g = gen(11)
    labels = [synth(img, None, g)[2] for _ in range(200)]
    assert abs(np.mean(labels) - 0.5) < 0.15


def test_same_seed_same_output_different_seed_differs() -> None:
    img = half_flat_image(32)
    sources = [torch.rand(3, 32, 32, generator=gen(12))]
    synth = AnomalySynthesizer(p=1.0)
    a = [synth(img, sources, gen(42)) for _ in range(2)]
    assert torch.equal(a[0][0], a[1][0]) and torch.equal(a[0][1], a[1][1]) and a[0][2] == a[1][2]
    b = synth(img, sources, gen(43))
    assert not torch.equal(a[0][0], b[0])


def test_outputs_stay_in_unit_range_with_strong_jitter() -> None:
    # A binary checkerboard sits on the range limits, so any overshoot of jitter/blend would show.
    img = ((torch.arange(32)[:, None] + torch.arange(32)[None, :]) % 2).float().expand(3, 32, 32).clone()
    synth = AnomalySynthesizer(p=1.0, jitter=0.5)
    g = gen(13)
    for _ in range(30):
        out, mask, _ = synth(img, None, g)
        assert out.min() >= 0.0 and out.max() <= 1.0
        assert_exact(out, mask, img)


def test_flat_image_falls_back_to_other_kind_or_stays_normal() -> None:
    flat = torch.full((3, 32, 32), 0.5)
    # CutPaste of a flat image onto itself without jitter cannot change anything ...
    out, mask, label = AnomalySynthesizer(p=1.0, kinds=("cutpaste",), jitter=0.0)(flat, None, gen(14))
    assert label == 0 and not mask.any() and torch.equal(out, flat)
    # ... so with Perlin available the synthesizer must fall back to it and still return an anomaly.
    for seed in range(5):
        synth = AnomalySynthesizer(p=1.0, kinds=("cutpaste", "perlin"), jitter=0.0, p_procedural=1.0)
        out, mask, label = synth(flat, None, gen(seed))
        assert label == 1
        assert_exact(out, mask, flat)


@pytest.mark.parametrize(
    "kwargs", [{"p": 1.5}, {"kinds": ()}, {"kinds": ("stain",)}, {"min_delta": 0.0}, {"max_tries": 0}]
)
def test_invalid_config_rejected(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        AnomalySynthesizer(**kwargs)


def test_rejects_out_of_range_image() -> None:
    with pytest.raises(ValueError):
        AnomalySynthesizer(p=1.0)(torch.full((3, 8, 8), 2.0), None, gen(0))


# ---------------------------------------------------------------- perlin


def test_perlin_shape_range_and_determinism() -> None:
    a = perlin_noise((30, 17), (3, 5), gen(0))
    assert a.shape == (30, 17) and a.abs().max() <= 1.0
    assert torch.equal(a, perlin_noise((30, 17), (3, 5), gen(0)))
    assert not torch.equal(a, perlin_noise((30, 17), (3, 5), gen(1)))
    rng_a = perlin_noise((16, 16), 2, np.random.default_rng(0))
    assert torch.equal(rng_a, perlin_noise((16, 16), 2, np.random.default_rng(0)))
    f = fractal_noise((32, 32), 2, gen(0), octaves=3)
    assert f.shape == (32, 32) and f.abs().max() <= 1.0


def test_perlin_is_smooth() -> None:
    # Mean |neighbour difference| / std: ~1.13 for white noise, ~0.15 for 16-px Perlin cells;
    # 0.35 separates them with room for seed-to-seed variation (~0.3 even at 8-px cells).
    n = perlin_noise((64, 64), 4, gen(2))
    assert (n[:, 1:] - n[:, :-1]).abs().mean() / n.std() < 0.35
    assert (n[1:] - n[:-1]).abs().mean() / n.std() < 0.35


def test_perlin_mask_makes_partial_blobs() -> None:
    g = gen(3)
    fracs = [perlin_mask((48, 48), g).float().mean().item() for _ in range(50)]
    # Mean area a few percent: neither empty (useless) nor the whole image (not a local defect).
    assert 0.005 < np.mean(fracs) < 0.3


# ---------------------------------------------------------------- augment


def gradient_image(h: int = 16, w: int = 20) -> torch.Tensor:
    """Red increases to the right, green downwards: any flip or rotation reverses a trend."""
    yy, xx = torch.meshgrid(torch.linspace(0.1, 0.9, h), torch.linspace(0.1, 0.9, w), indexing="ij")
    return torch.stack([xx, yy, torch.full_like(xx, 0.5)])


def orientation(img: torch.Tensor) -> tuple[bool, bool]:
    red_cols, green_rows = img[0].mean(0), img[1].mean(1)
    return bool(red_cols[-1] > red_cols[0]), bool(green_rows[-1] > green_rows[0])


def test_augment_keeps_shape_and_range() -> None:
    img = torch.rand(3, 32, 40, generator=gen(0))
    aug = NormalAugment(flips=True, rotations=True, brightness=0.5, contrast=0.5, saturation=0.5)
    g = gen(1)
    for _ in range(20):
        out = aug(img, g)
        assert out.shape == img.shape and out.min() >= 0.0 and out.max() <= 1.0


def test_augment_defaults_never_mirror_or_rotate() -> None:
    aug = NormalAugment()
    assert not aug.flips and not aug.rotations
    img, g = gradient_image(), gen(2)
    # Enabled flips would mirror 3 draws in 4, so 100 clean draws cannot be luck.
    assert all(orientation(aug(img, g)) == (True, True) for _ in range(100))


@pytest.mark.parametrize("cfg", [NormalAugment(flips=True), NormalAugment(rotations=True)])
def test_orientation_detector_sees_enabled_flips_and_rotations(cfg: NormalAugment) -> None:
    # Guards the test above: if the detector were blind, this would fail.
    img, g = gradient_image(), gen(3)
    assert any(orientation(cfg(img, g)) != (True, True) for _ in range(50))


def test_shift_is_small_and_reflect_padded() -> None:
    img = torch.rand(3, 40, 40, generator=gen(4))
    g = gen(5)
    for _ in range(10):
        out = random_shift(img, g, max_shift=0.1)
        # The output must equal the input translated by at most 4 px (10% of 40) in each direction.
        hits = [
            (dy, dx)
            for dy in range(-4, 5)
            for dx in range(-4, 5)
            if torch.equal(out[:, 4:-4, 4:-4], img[:, 4 + dy : 36 + dy, 4 + dx : 36 + dx])
        ]
        assert len(hits) == 1
    assert torch.equal(random_shift(img, g, max_shift=0.0), img)


def test_color_jitter_zero_strength_is_identity_and_seeded() -> None:
    img = torch.rand(3, 16, 16, generator=gen(6))
    assert torch.equal(color_jitter(img, gen(0), 0.0, 0.0, 0.0), img)
    a, b = color_jitter(img, gen(1), 0.2, 0.2, 0.2), color_jitter(img, gen(1), 0.2, 0.2, 0.2)
    assert torch.equal(a, b) and not torch.equal(a, img)
    assert torch.equal(NormalAugment()(img, gen(7)), NormalAugment()(img, gen(7)))
