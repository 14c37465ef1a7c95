"""Image-space tools that fabricate evidence from good shots alone: synthetic defects with exact masks (for
calibration and fine-tuning) and normal-preserving augmentations. Pure tensor ops, no training loop."""

from clipshot.synthetic.anomalies import KINDS, AnomalySynthesizer, cutpaste, cutpaste_scar, perlin_blend
from clipshot.synthetic.augment import NormalAugment, color_jitter, random_shift

__all__ = ["KINDS", "AnomalySynthesizer", "NormalAugment", "color_jitter", "cutpaste", "cutpaste_scar",
           "perlin_blend", "random_shift"]
