"""Map -> image score rules (issue 10): the peak and the peak-mean geometric mean, and the setting's plumbing."""

from __future__ import annotations

import pytest
import torch

from clipshot.adapter import Adapter
from clipshot.fusion import ScoringConfig, image_score, map_score, map_threshold


def _maps() -> torch.Tensor:
    """Two 10x10 maps: a single strong mark on a clean part, and a weaker fault spread over a fifth of the part."""
    mark = torch.zeros(10, 10)
    mark[4, 4] = 0.5
    spread = torch.full((10, 10), 0.02)
    spread[:2] = 0.3
    spread[0, 0] = 0.4
    return torch.stack([mark, spread])


def test_peak_ranks_by_the_worst_spot_only():
    scores = map_score(_maps(), ScoringConfig(image_score="peak"))
    assert scores.tolist() == pytest.approx([0.5, 0.4])


def test_peak_mean_is_the_geometric_mean_and_counts_how_much_is_off():
    maps = _maps()
    scores = map_score(maps, ScoringConfig(image_score="peak_mean"))
    expected = [(0.5 * 0.005) ** 0.5, (0.4 * maps[1].mean().item()) ** 0.5]
    assert scores.tolist() == pytest.approx(expected, rel=1e-5)
    assert scores[1] > scores[0]  # the spread fault now ranks above the single harmless mark


def test_peak_mean_keeps_the_order_of_maps_that_differ_by_a_scale():
    # No weight to choose: scaling a map scales its score by the same factor under both rules.
    maps = _maps()
    config = ScoringConfig()
    assert torch.allclose(map_score(3 * maps, config), 3 * map_score(maps, config))


def test_text_combination_uses_the_map_score():
    maps, cls = _maps(), torch.tensor([0.2, 0.2])
    config = ScoringConfig(image_combination="max")
    assert torch.allclose(image_score(cls, maps, config), torch.maximum(cls, map_score(maps, config)))


def test_unknown_image_score_is_refused_by_name():
    with pytest.raises(ValueError, match="image_score must be one of"):
        ScoringConfig(image_score="top1")


def test_bundle_keeps_the_rule_and_older_bundles_keep_the_peak():
    adapter = Adapter(category="c", scoring=ScoringConfig(image_score="peak_mean"))
    assert Adapter.from_tensors("c", {}, adapter.config()).scoring.image_score == "peak_mean"
    config = adapter.config()
    del config["scoring"]["image_score"]  # a manifest written before the setting
    assert Adapter.from_tensors("c", {}, config).scoring.image_score == "peak"


@pytest.mark.parametrize("rule", ["peak", "peak_mean"])
def test_map_threshold_marks_exactly_what_made_the_verdict(rule):
    # The overlay, mask and regions start at map_threshold: for every map and threshold, "the image score passes
    # the threshold" must equal "some map pixel passes map_threshold", or a flagged part could show no region.
    config = ScoringConfig(image_score=rule)
    generator = torch.Generator().manual_seed(0)
    maps = torch.rand(50, 8, 8, generator=generator) ** 3
    scores = map_score(maps, config)
    for threshold in torch.linspace(0.01, 0.9, 40).tolist():
        for heat, score in zip(maps, scores.tolist(), strict=True):
            if abs(score - threshold) < 1e-6:
                continue  # a tie is float noise either way
            assert (score > threshold) == bool(heat.max() > map_threshold(threshold, heat, config))
    assert map_threshold(None, maps[0], config) is None


def test_zero_shot_adapters_keep_the_peak_and_memory_adapters_get_peak_mean(tiny_detector, good_images):
    # peak_mean was chosen by measuring the memory branch; a text-only map was never measured (no CLIP weights).
    assert tiny_detector.text_adapter(category="c").scoring.image_score == "peak"
    fused = tiny_detector.fit_memory(good_images, category="c", text=True, calibration_views=0)
    # and the shipped memory distance is the origin cosine: centring is a per-product choice, not a default
    assert fused.scoring.image_score == "peak_mean" and not fused.memory.centered
