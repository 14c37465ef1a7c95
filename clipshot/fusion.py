"""Fusion of the available branches into one map and one image score."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

COMBINATIONS = ("harmonic", "mean", "max")


@dataclass
class ScoringConfig:
    """How an adapter turns branch outputs into a verdict; stored in the bundle manifest."""

    text_weight: float = 0.5  # weight of the text map when both branches exist (memory gets 1 - this)
    image_combination: str = "harmonic"  # text CLS score with the map maximum: WinCLIP+/PromptAD harmonic mean
    temperature: float = 100.0
    dpam: bool = False
    sigma: float = 4.0

    def __post_init__(self) -> None:
        if self.image_combination not in COMBINATIONS:
            raise ValueError(f"image_combination must be one of {COMBINATIONS}, got {self.image_combination!r}")
        if not 0 <= self.text_weight <= 1:
            raise ValueError("text_weight must be in [0, 1]")

    def to_dict(self) -> dict:
        return asdict(self)


def fuse_maps(text_map: torch.Tensor | None, memory_map: torch.Tensor | None, config: ScoringConfig) -> torch.Tensor:
    if text_map is None and memory_map is None:
        raise ValueError("an adapter needs a text branch, a memory branch, or both")
    if text_map is None:
        return memory_map
    if memory_map is None:
        return text_map
    return config.text_weight * text_map + (1 - config.text_weight) * memory_map


def image_score(cls_score: torch.Tensor | None, pixel_maps: torch.Tensor, config: ScoringConfig) -> torch.Tensor:
    """(B,) image score: the map maximum, combined with the text CLS score when there is one."""
    peak = pixel_maps.flatten(1).amax(dim=1)
    if cls_score is None:
        return peak
    if config.image_combination == "harmonic":
        return 2 * cls_score * peak / (cls_score + peak).clamp_min(1e-8)
    if config.image_combination == "mean":
        return (cls_score + peak) / 2
    return torch.maximum(cls_score, peak)
