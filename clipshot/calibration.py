"""Threshold from normal shots only: the verdict must work before any defect has ever been seen."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from PIL import Image, ImageEnhance
from scipy.stats import norm

DEFAULT_FALSE_ALARM_RATE = 0.01


@dataclass
class Calibration:
    """Normal-score statistics and the threshold derived from them (``score > threshold`` = anomalous)."""

    threshold: float
    target_false_alarm_rate: float
    mean: float
    std: float
    max_normal: float
    count: int
    method: str

    def to_dict(self) -> dict:
        return asdict(self)


def calibrate(normal_scores: Sequence[float], false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE,
              method: str = "leave-one-out") -> Calibration:
    """Gaussian fit of the normal scores: threshold = mean + z(1 - rate) * std, never below the largest
    normal score seen (a handful of shots cannot estimate a 1% quantile directly, a fitted tail can)."""
    scores = [float(s) for s in normal_scores]
    if not scores:
        raise ValueError("calibration needs at least one normal score")
    if not 0 < false_alarm_rate < 0.5:
        raise ValueError("false_alarm_rate must be in (0, 0.5)")
    mean = statistics.fmean(scores)
    std = statistics.stdev(scores) if len(scores) > 1 else 0.0
    std = max(std, 1e-3 * max(abs(mean), 1e-6))
    threshold = max(mean + float(norm.ppf(1 - false_alarm_rate)) * std, max(scores))
    if not math.isfinite(threshold):
        raise ValueError("calibration produced a non-finite threshold")
    return Calibration(threshold, false_alarm_rate, mean, std, max(scores), len(scores), method)


def light_views(image: Image.Image, count: int) -> list[Image.Image]:
    """Small shifts and brightness changes a production line produces anyway; scoring them as normal
    widens the normal distribution to what the camera will really deliver."""
    width, height = image.size
    dx, dy = max(1, width // 50), max(1, height // 50)
    variants = [
        lambda im: im.transform(im.size, Image.Transform.AFFINE, (1, 0, dx, 0, 1, dy), Image.Resampling.BILINEAR,
                                fillcolor=im.getpixel((0, 0))),
        lambda im: ImageEnhance.Brightness(im).enhance(1.05),
        lambda im: im.transform(im.size, Image.Transform.AFFINE, (1, 0, -dx, 0, 1, -dy),
                                Image.Resampling.BILINEAR, fillcolor=im.getpixel((width - 1, height - 1))),
        lambda im: ImageEnhance.Brightness(im).enhance(0.95),
    ]
    rgb = image.convert("RGB")
    return [variants[i % len(variants)](rgb) for i in range(count)]
