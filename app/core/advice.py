"""What the service tells people about answers that are technically valid but probably not what they meant.

Two kinds of advice, both plain sentences in a ``warnings`` list of the response:

* **Decision rules that switch inspection off.** A threshold is a trade between the share of good parts
  flagged (expected false-alarm rate) and the share of defects caught (expected recall). Two ends of that
  trade are never what a line wants: a recall of 0 (no defect evidence scores above the threshold, so
  nothing will be flagged) and a false-alarm rate of a half or more (at least every second good part is
  flagged: the verdict says less about a part than a coin flip says about a fair coin, and operators
  learn to ignore it).
* **Images unlike the shots.** The memory holds features of the shots at their size and colour; an upload
  that the model must blow up far beyond the shots' scale, that lacks (or adds) colour, or that the
  geometry must stretch to another aspect is compared with features it cannot match, and is flagged
  anomalous for reasons that have nothing to do with the part.

The rules live here, once: the routes return the warnings, the console only shows them.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

# -- decision rules ----------------------------------------------------------------------------------------

# Recall at or below this: no defect evidence (confirmed or synthetic) scores above the threshold.
RECALL_OFF = 0.0
# False-alarm rate at or above this: at least every second good part is flagged.
FALSE_ALARM_HIGH = 0.5


def decision_warnings(decision: Mapping[str, Any] | None) -> list[str]:
    """Sentences for a decision whose expected rates mean the inspection no longer inspects."""
    if not decision:
        return []
    warnings = []
    recall = decision.get("expected_recall")
    if recall is not None and recall <= RECALL_OFF:
        warnings.append(f"expected recall is {recall:.2f}: no defect evidence scores above threshold "
                        f"{decision['threshold']:.4g}, so detection is effectively off")
    rate = decision.get("expected_false_alarm_rate")
    if rate is not None and rate >= FALSE_ALARM_HIGH:
        warnings.append(f"expected false-alarm rate is {rate:.2f}: at least half of the good parts would be "
                        f"flagged at threshold {decision['threshold']:.4g}")
    return warnings


# -- images against the shots ------------------------------------------------------------------------------

# An upload whose side is less than half the shots' (median, by area) would be upscaled more than 2x per side
# relative to them: each of its pixels stands for 4+ shot pixels, so the fine texture the memory learnt is
# gone and every patch looks unfamiliar.
MAX_UPSCALE = 2.0
# Aspect ratios further apart than this factor are stretched differently by the geometry: 4:3 vs 3:2 cameras
# (1.125) pass, 4:3 vs 16:9 (1.33) or a frame turned by 90 degrees do not.
MAX_ASPECT_FACTOR = 1.2
# Mean per-pixel channel spread (max - min of R, G, B, in 0..255 levels, on a 64 px thumbnail). A greyscale
# picture decodes with equal channels (0.0, also after a JPEG round trip as RGB); the least colourful product
# in the shared sets (MVTec bottle) measures about 7.5. Between the two bars nothing is said, so a product
# whose colour is borderline never gets warnings that flip with lighting.
GREY_CHROMA = 1.0
COLOUR_CHROMA = 3.0
_THUMB_SIDE = 64
_GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N"})


def chroma(image: Image.Image, mode: str | None = None) -> float:
    """Mean channel spread of ``image`` (RGB) on a small thumbnail; 0 for a file stored in a grey mode."""
    if mode in _GREY_MODES:
        return 0.0
    factor = max(1, min(image.size) // _THUMB_SIDE)
    small = image.reduce(factor) if factor > 1 else image
    pixels = np.asarray(small.convert("RGB"), dtype=np.int16)
    return float((pixels.max(axis=2) - pixels.min(axis=2)).mean())


def shot_image_facts(sizes: Sequence[tuple[int, int]], chromas: Sequence[float]) -> dict[str, Any] | None:
    """What the shots looked like, recorded with the adapter: median size (by area) and median chroma."""
    if not sizes:
        return None
    median_area = statistics.median_low(sorted(w * h for w, h in sizes))
    width, height = next((w, h) for w, h in sizes if w * h == median_area)
    return {"size": [width, height], "chroma": round(statistics.median(chromas), 3) if chromas else None,
            "count": len(sizes)}


def image_warnings(facts: Mapping[str, Any] | None, image: Image.Image, mode: str | None = None) -> list[str]:
    """Sentences for an upload that differs from the shots in scale, colour or aspect (none without facts)."""
    if not facts or not facts.get("size"):
        return []
    shot_w, shot_h = facts["size"]
    width, height = image.size
    warnings = []
    upscale = ((shot_w * shot_h) / (width * height)) ** 0.5
    if upscale > MAX_UPSCALE:
        warnings.append(f"image is {width}x{height}, far smaller than the product's shots ({shot_w}x{shot_h}): "
                        f"it is enlarged {upscale:.1f}x more than they were, so its verdict is unreliable")
    aspect = (width / height) / (shot_w / shot_h)
    if max(aspect, 1 / aspect) > MAX_ASPECT_FACTOR:
        warnings.append(f"image aspect ratio {width / height:.2f} differs from the shots' "
                        f"{shot_w / shot_h:.2f}: it is stretched differently, so its verdict is unreliable")
    shots = facts.get("chroma")
    if shots is not None:
        mine = chroma(image, mode)
        if shots >= COLOUR_CHROMA and mine < GREY_CHROMA:
            warnings.append("image is greyscale but the product's shots are in colour: its verdict is unreliable")
        elif shots < GREY_CHROMA and mine >= COLOUR_CHROMA:
            warnings.append("image is in colour but the product's shots are greyscale: its verdict is unreliable")
    return warnings
