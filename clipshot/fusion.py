"""Fusion of the available branches into one map and one image score."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

COMBINATIONS = ("harmonic", "mean", "max")
# How a map becomes one number: "peak" = the map's maximum (the worst spot); "peak_mean" = the geometric mean of
# that maximum and the map's mean (how much of the part is off), with no weight to choose: both are distances
# on the same scale, and the geometric mean ranks by their relative change alike.
IMAGE_SCORES = ("peak", "peak_mean")
POSITION_BASELINES = ("off", "auto", "on")


@dataclass
class ScoringConfig:
    """How an adapter turns branch outputs into a verdict; stored in the bundle manifest."""

    text_weight: float = 0.5  # weight of the text map when both branches exist (memory gets 1 - this)
    image_combination: str = "harmonic"  # text CLS score with the map score: WinCLIP+/PromptAD harmonic mean
    temperature: float = 100.0
    dpam: bool = False
    sigma: float = 4.0
    # Memory distances measured around the shots' mean patch (``MemoryBank`` docstring). Off by default: it lifted
    # the ball screw but ruined localisation on textures (on a paper texture the mean patch *is* the texture and
    # what is left is noise; ``benchmarks/accuracy_suite.py``). A product can still choose it from its own shots
    # (``clipshot.scoring_selection``). Bundles written before this setting load with False.
    memory_center: bool = False
    # Map -> image score (``IMAGE_SCORES``). Bundles written before this setting load with "peak".
    image_score: str = "peak_mean"
    # Score each backbone stage concatenated in a patch vector by its own cosine (``MemoryBank`` docstring);
    # no effect on backbones whose layers are already separate (CLIP). Bundles written before load with False.
    memory_stages: bool = True
    # Search each stage at its own stride (``MemoryBank`` docstring: the stride-16 stage at every other cell of the
    # stride-8 grid, interpolated between) instead of at every cell of the grid it was upsampled onto: 2.2x fewer
    # multiply-adds in the nearest-neighbour search, no shared dataset moving more than 0.8 points on a gated metric
    # (docs/results/stage-grids/). Bundles written before this setting load with False.
    memory_stage_grids: bool = True
    # Divide the map by the normal level the shots show at each position (``clipshot.position_baseline``): "auto"
    # (the product decides from its own synthetic defects at calibration), "on" or "off". Bundles written before
    # this setting load with "off".
    position_baseline: str = "auto"

    def __post_init__(self) -> None:
        if self.image_combination not in COMBINATIONS:
            raise ValueError(f"image_combination must be one of {COMBINATIONS}, got {self.image_combination!r}")
        if self.image_score not in IMAGE_SCORES:
            raise ValueError(f"image_score must be one of {IMAGE_SCORES}, got {self.image_score!r}")
        if self.position_baseline not in POSITION_BASELINES:
            raise ValueError(f"position_baseline must be one of {POSITION_BASELINES}, got {self.position_baseline!r}")
        if not 0 <= self.text_weight <= 1:
            raise ValueError("text_weight must be in [0, 1]")

    def to_dict(self) -> dict:
        return asdict(self)


def fuse_maps(text_map: torch.Tensor | None, memory_map: torch.Tensor | None, config: ScoringConfig) -> torch.Tensor:
    if memory_map is None:
        if text_map is None:
            raise ValueError("an adapter needs a text branch, a memory branch, or both")
        return text_map
    if text_map is None:
        return memory_map
    return config.text_weight * text_map + (1 - config.text_weight) * memory_map


def map_score(pixel_maps: torch.Tensor, config: ScoringConfig) -> torch.Tensor:
    """(B,) one number per map, by ``config.image_score``.

    The maximum alone ranks a part by its worst spot, so a good part with one strong but harmless mark (a worn
    band, a reflection) outranks a part whose damage is spread over more of the surface. The geometric mean with
    the map's mean keeps the worst spot decisive while counting how much of the part is off. Measured on the two
    shared sets (issue 10): ball screw image AUROC +2.4 at 4 shots (+1.8 to +4.2 at 1-16 shots), bottle unchanged.
    The mean is over the whole model frame, all tiles included; letterbox padding (matched in the shots) counts
    as normal surface, so an upload with another aspect ratio than the shots shifts it a little."""
    flat = pixel_maps.flatten(1)
    peak = flat.amax(dim=1)
    if config.image_score == "peak":
        return peak
    return (peak.clamp_min(0) * flat.mean(dim=1).clamp_min(0)).sqrt()


def map_threshold(threshold: float | None, frame_map: torch.Tensor, config: ScoringConfig) -> float | None:
    """The level one map pixel must pass for this image to be flagged, so heatmap pixels "above threshold"
    (overlay tint, mask, regions) mark exactly what made the verdict: the image is anomalous iff its map's
    maximum exceeds this. "peak": the threshold itself. "peak_mean": sqrt(max * mean) > t iff max > t^2 / mean,
    so the level is t^2 / mean of this image's frame map (a part that is off all over flags weaker spots).
    Exact for map-only adapters; with a text branch the CLS score also enters the image score, so there (as
    under "peak" before) the level is the map's own share of the decision."""
    if threshold is None or config.image_score == "peak":
        return threshold
    mean = float(frame_map.float().mean().clamp_min(1e-12))
    return threshold * threshold / mean


def image_score(cls_score: torch.Tensor | None, pixel_maps: torch.Tensor, config: ScoringConfig) -> torch.Tensor:
    """(B,) image score: the map score (``map_score``), combined with the text CLS score when there is one."""
    peak = map_score(pixel_maps, config)
    if cls_score is None:
        return peak
    if config.image_combination == "harmonic":
        return 2 * cls_score * peak / (cls_score + peak).clamp_min(1e-8)
    if config.image_combination == "mean":
        return (cls_score + peak) / 2
    return torch.maximum(cls_score, peak)
