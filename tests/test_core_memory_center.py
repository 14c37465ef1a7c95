"""Memory distances around the shots' mean patch (issue 10): the centre, the distances, persistence and the
setting. What centring buys on real images is checked in ``test_decisions_real_data.py``."""

from __future__ import annotations

import pytest
import torch
from torch.nn.functional import normalize

from clipshot.adapter import Adapter
from clipshot.features import Features
from clipshot.fusion import ScoringConfig
from clipshot.memory_branch import MemoryBank


def _features(count: int, dim: int = 6, seed: int = 0, offset: float = 3.0) -> Features:
    """``count`` images of a 2x3 grid whose patches share a large common component, as pretrained features do."""
    generator = torch.Generator().manual_seed(seed)
    common = torch.zeros(dim)
    common[0] = offset
    patches = normalize(common + torch.randn(count, 6, dim, generator=generator), dim=-1)
    return Features(cls=None, patches=[patches], grid=(2, 3))


def test_centre_is_the_mean_of_every_patch_even_with_a_coreset():
    features = _features(4)
    bank = MemoryBank.from_features(features, coreset_ratio=0.25, center=True)
    assert bank.size == 6  # the coreset kept a quarter of the 24 patches ...
    expected = features.patches[0].reshape(-1, 6).mean(dim=0)
    # ... but the centre is the mean of all 24 (fp32, so exact up to summation order).
    assert torch.allclose(bank.centers[0], expected, atol=1e-6)
    assert not MemoryBank.from_features(features).centered


def test_centred_distance_is_the_cosine_around_the_centre():
    shots, query = _features(3, seed=1), _features(2, seed=2)
    bank = MemoryBank.from_features(shots, center=True)
    centre = shots.patches[0].reshape(-1, 6).mean(dim=0)
    stored = normalize(bank.layers[0].float() - centre, dim=-1)  # the bank is kept fp16, as in a bundle
    moved = normalize(query.patches[0].reshape(-1, 6) - centre, dim=-1)
    expected = ((1 - (moved @ stored.T).amax(dim=1)) / 2).view(2, 2, 3)
    assert torch.allclose(bank.distances(query), expected, atol=2e-3)
    # Without the centre the same data gives the plain cosine, which differs: the test sees a missing shift.
    plain = MemoryBank.from_features(shots).distances(query)
    assert not torch.allclose(plain, expected, atol=2e-3)


def test_centring_uses_the_full_angle_instead_of_a_sliver_of_it():
    # The property the rule is for: with a large common component every origin cosine is squeezed near 1, so
    # distances use a small part of [0, 1]; around the centre the spread of normal patches is a full sphere again.
    shots, query = _features(4, seed=3, offset=10.0), _features(4, seed=4, offset=10.0)
    plain = MemoryBank.from_features(shots).distances(query)
    centred = MemoryBank.from_features(shots, center=True).distances(query)
    # Common part 10 vs noise of norm ~2.4: origin angles are ~1/4 of the centred ones, cosines ~1/16.
    assert centred.mean() > 5 * plain.mean()


def test_centred_bank_is_rejected_when_centres_do_not_match_layers():
    with pytest.raises(ValueError, match="centre per layer"):
        MemoryBank([torch.zeros(4, 6)], [torch.zeros(5)])


def _adapter(center: bool) -> Adapter:
    bank = MemoryBank.from_features(_features(3), center=center)
    return Adapter(category="c", scoring=ScoringConfig(memory_center=center), memory=bank)


def test_bundle_form_keeps_the_centre():
    adapter = _adapter(True)
    config, tensors = adapter.config(), adapter.to_tensors()
    assert config["memory_centered"] is True and "memory.center0" in tensors
    loaded = Adapter.from_tensors("c", tensors, config)
    assert loaded.scoring.memory_center and loaded.memory.centered
    assert torch.equal(loaded.memory.centers[0], adapter.memory.centers[0])
    query = _features(2, seed=5)
    assert torch.equal(loaded.memory.distances(query), adapter.memory.distances(query))


def test_bundle_written_before_centring_scores_as_it_was_calibrated():
    adapter = _adapter(False)
    config, tensors = adapter.config(), adapter.to_tensors()
    del config["memory_centered"], config["scoring"]["memory_center"]  # what an older manifest holds
    loaded = Adapter.from_tensors("c", tensors, config)
    assert loaded.scoring.memory_center is False and not loaded.memory.centered


def test_bundle_promising_a_centre_it_lacks_is_corrupt():
    adapter = _adapter(True)
    tensors = adapter.to_tensors()
    del tensors["memory.center0"]
    with pytest.raises(ValueError, match="memory.center0"):
        Adapter.from_tensors("c", tensors, adapter.config())


@pytest.mark.parametrize("center", [True, False])
def test_fit_memory_follows_the_scoring_setting(tiny_detector, good_images, center):
    adapter = tiny_detector.fit_memory(good_images, category="tex", text=False,
                                       scoring=ScoringConfig(memory_center=center, position_baseline="off"))
    assert adapter.memory.centered is center
    # A shot scored against its own (centred or not) memory is a perfect match either way (plain distances).
    assert tiny_detector.predict([good_images[1]], adapter)[0].score < 2e-3


def _held_bytes(value: object, seen: set[int] | None = None) -> int:
    """Bytes of every tensor an object holds in its attributes (lists, dicts and tuples followed)."""
    seen = set() if seen is None else seen
    if id(value) in seen:
        return 0
    seen.add(id(value))
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_held_bytes(v, seen) for v in value.values())
    if isinstance(value, list | tuple):
        return sum(_held_bytes(v, seen) for v in value)
    return sum(_held_bytes(v, seen) for v in getattr(value, "__dict__", {}).values())


def test_a_centred_staged_bank_is_held_once_after_scoring():
    """The bank keeps its fp16 layers and fp32 centres only: scoring derives the centred, per-stage fp32 form
    and lets it go (before: that form stayed cached beside the fp16 layers, three times their bytes on CPU)."""
    shots, query = _features(8, dim=12, seed=3), _features(2, dim=12, seed=4)
    bank = MemoryBank.from_features(shots, center=True, stages=[4, 8])
    stored = 48 * 12 * 2 + 12 * 4  # 8 images x 6 patches x 12 dims fp16, plus one fp32 centre of 12 dims
    assert bank.nbytes == stored == _held_bytes(bank)
    first = bank.distances(query, "fp32")
    assert _held_bytes(bank) == stored  # nothing kept from scoring
    assert torch.equal(bank.distances(query, "fp32"), first)  # derived again, the same distances
