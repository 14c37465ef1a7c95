"""Thresholds from good shots only, and the evidence that lets an operator move them later.

Only normal photos exist when a product is registered, so the verdict rests on two kinds of evidence gathered
at fit time and kept in the bundle: leave-one-out scores of the shots (how far a *normal* part scores against a
memory that has not seen it) and scores of synthetic defects made from the shots (where a *defect* scores).
Operators add real evidence later (confirmed defects, confirmed good parts). Every policy — automatic, a target
false-alarm rate, a manual threshold — is a function of that stored evidence, so a policy change needs no
re-extraction and always reports what it expects to happen.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Literal

import numpy as np
from PIL import Image, ImageEnhance
from scipy.stats import beta
from scipy.stats import t as student_t

DEFAULT_FALSE_ALARM_RATE = 0.01
POLICIES = ("auto", "target_rate", "manual")
WEAK_DEFECT_QUANTILE = 0.1  # "the weakest decile" of the defect evidence
# The false-alarm rate a version reports is an upper bound that holds with this probability over the draw of the
# good images it was calibrated on (one-sided Clopper-Pearson on how many of them score above the threshold).
FALSE_ALARM_CONFIDENCE = 0.9
# ``confident`` = the evidence bounds the false-alarm rate by this much or less: a line that stops one good part
# in five for a re-check can still run; beyond it the operator must expect to confirm parts by hand. With no good
# image above the threshold that takes 11 good images (shots and confirmed goods): 1 - 0.1 ** (1 / 11) = 0.189.
CONFIDENT_FALSE_ALARM_BOUND = 0.2
# Fewer good images than this give no verdict under the automatic or target-rate policy: leave-one-out needs a
# second image, and one photo scored against itself says nothing about how much good parts differ.
MIN_VERDICT_IMAGES = 2


@dataclass(frozen=True)
class DecisionPolicy:
    """How the threshold is chosen: ``auto`` (the default rule), ``target_rate`` (a false-alarm rate the
    operator asks for) or ``manual`` (a threshold the operator sets)."""

    kind: str = "auto"
    target_false_alarm_rate: float | None = None
    threshold: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.kind!r}")
        if self.kind == "target_rate":
            rate = self.target_false_alarm_rate
            if rate is None or not 0 < rate < 0.5:
                raise ValueError("target_false_alarm_rate must be in (0, 0.5)")
        if self.kind == "manual":
            t = self.threshold
            if t is None or not math.isfinite(t) or t < 0:
                raise ValueError("a manual threshold must be a finite number >= 0")


@dataclass
class Calibration:
    """The threshold, how it was chosen, and the evidence it was chosen from (``score > threshold`` = anomalous)."""

    threshold: float
    target_false_alarm_rate: float | None
    mean: float
    std: float
    max_normal: float
    count: int
    method: str
    policy: str = "auto"
    normal_scores: list[float] = field(default_factory=list)
    defect_scores: list[float] = field(default_factory=list)
    validation_defect_scores: list[float] = field(default_factory=list)
    expected_false_alarm_rate: float | None = None
    expected_recall: float | None = None
    shots: int = 0
    confident: bool = True
    note: str | None = None
    verdicts: bool = True  # False: too little evidence for ``score > threshold`` to decide (``MIN_VERDICT_IMAGES``)
    confirmed: list[int] = field(default_factory=list)  # good images (in ``normal_scores`` order) an operator confirmed

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Calibration:
        """Tolerates bundles written before the evidence fields existed (they load with empty evidence)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def policy_spec(self) -> DecisionPolicy:
        """The policy this calibration was made under (re-fits keep it)."""
        if self.policy == "manual":
            return DecisionPolicy("manual", threshold=self.threshold)
        if self.policy == "target_rate":
            return DecisionPolicy("target_rate", target_false_alarm_rate=self.target_false_alarm_rate)
        return DecisionPolicy()

    def decision(self) -> dict:
        """The public face of the policy (what the service returns with a category)."""
        return {"threshold": self.threshold, "policy": self.policy,
                "target_false_alarm_rate": self.target_false_alarm_rate,
                "expected_false_alarm_rate": self.expected_false_alarm_rate,
                "expected_recall": self.expected_recall, "confident": self.confident, "note": self.note,
                "verdicts": self.verdicts}


def _normal_fit(scores: Sequence[float]) -> tuple[float, float]:
    mean = float(np.mean(scores))
    std = float(np.std(scores, ddof=1)) if len(scores) > 1 else 0.0
    return mean, max(std, 1e-3 * max(abs(mean), 1e-6))


def _log_fit(scores: Sequence[float], shots: int) -> tuple[float, float, int]:
    """(centre, predictive scale, degrees of freedom) of the log-normal the normal scores suggest.

    Scores are distances (positive, right-skewed), so the fit is on log scores. The sample is worth as many
    independent draws as there are *shots* (the light views of one shot are not independent of it), so the
    Student-t prediction interval for one new part uses n = shots: wide with 4 shots, close to the Gaussian
    tail with 16. That is what keeps a tight cluster of near-identical shots from promising 1 % false alarms
    on parts that vary more than the shots did."""
    logs = np.log(np.maximum(np.asarray(scores, dtype=np.float64), 1e-12))
    n = max(int(shots), 2)
    sd = float(np.std(logs, ddof=1)) if logs.size > 1 else 0.0
    sd = max(sd, 1e-3)
    return float(np.mean(logs)), sd * math.sqrt(1 + 1 / n), n - 1


def _estimated_rate(cal: Calibration, threshold: float) -> float:
    """Share of good parts above ``threshold`` under the predictive law of the normal evidence (a point guess)."""
    if threshold <= 0:
        return 1.0
    centre, scale, dof = _log_fit(cal.normal_scores, cal.shots or len(cal.normal_scores))
    return float(student_t.sf((math.log(threshold) - centre) / scale, dof))


def images_above(cal: Calibration, threshold: float) -> tuple[int, int]:
    """(good images with any leave-one-out score above ``threshold``, good images): the count a bound rests on.

    ``normal_scores`` holds, per good image in order, its own score and its light views' (``clipshot.calibration_fit``);
    the views of one image are not independent of it, so an image counts once, as above if any of its views is."""
    images = max(1, int(cal.shots or len(cal.normal_scores)))
    return sum(m > threshold for m in _image_maxima(cal)), images


def false_alarm_rate_at(cal: Calibration, threshold: float) -> float | None:
    """An upper bound on the share of good parts flagged at ``threshold``, or None where the evidence cannot
    support one (fewer than ``MIN_VERDICT_IMAGES`` good images).

    The bound is the one-sided ``FALSE_ALARM_CONFIDENCE`` Clopper-Pearson limit on how many of the n good images
    scored above the threshold against a memory without them (exchangeable with a new good part, so the limit is
    distribution-free), or the log-normal estimate where that is larger. With no image above the threshold it is
    1 - 0.1 ** (1 / n): 44 % with 4 good images, 13 % with 16 — what so few photos can honestly promise. It holds
    for parts that vary as the shots did; shots from one batch or one position understate the variation, which is
    why it is a bound and not a point estimate, and why confirming good parts (feedback) is what tightens it."""
    if not cal.normal_scores:
        return None
    above, images = images_above(cal, threshold)
    if images < MIN_VERDICT_IMAGES:
        return None
    limit = 1.0 if above >= images else float(beta.ppf(FALSE_ALARM_CONFIDENCE, above + 1, images - above))
    return max(limit, _estimated_rate(cal, threshold))


def recall_at(cal: Calibration, threshold: float) -> float | None:
    """Expected share of defects above ``threshold``: real confirmed defects when there are any, else the
    synthetic ones (an optimistic stand-in: real defects are often subtler than a pasted patch)."""
    evidence = cal.validation_defect_scores or cal.defect_scores
    if not evidence:
        return None
    return float(np.mean(np.asarray(evidence) > threshold))


def threshold_for_rate(normal_scores: Sequence[float], rate: float, shots: int | None = None) -> float:
    """Threshold a new good part exceeds with probability ``rate`` (the predictive bound of ``_log_fit``)."""
    if not 0 < rate < 0.5:
        raise ValueError("target_false_alarm_rate must be in (0, 0.5)")
    centre, scale, dof = _log_fit(normal_scores, shots or len(normal_scores))
    return float(math.exp(centre + float(student_t.ppf(1 - rate, dof)) * scale))


def floor(cal: Calibration) -> float:
    """The score the automatic threshold never goes below: the largest leave-one-out score of a good image, except
    that the single highest-scoring image does not set it alone when it is an operator-confirmed good.

    Why: a photo labelled good by mistake through feedback (a real defect, or another product) scores far above
    the others; were it the floor, the threshold would sit above that defect for every later version, since
    re-fits keep the confirmed goods. A registration shot still sets the floor alone (the shots define normal),
    and two confirmed goods at that level do (real variation the shots missed). The image still counts in the
    false-alarm bound, and the note names it, so the operator sees it and can remove it
    (``DELETE .../shots/{sha256}``) or confirm more goods like it."""
    maxima = _image_maxima(cal)
    ranked = sorted(range(len(maxima)), key=lambda i: maxima[i], reverse=True)
    if len(ranked) > 1 and ranked[0] in set(cal.confirmed):
        return maxima[ranked[1]]
    return max(cal.normal_scores)


@dataclass(frozen=True)
class Confidence:
    """How unusual one score is against the product's stored evidence (``decision_confidence``)."""

    good_p_value: float  # (good images scoring >= the score + 1) / (good images + 1)
    defect_p_value: float | None  # (defect scores <= the score + 1) / (defect scores + 1); None without any
    good_images: int
    defect_images: int
    defect_evidence: Literal["confirmed", "synthetic"] | None  # operator feedback, made from the shots, or none


def decision_confidence(cal: Calibration, score: float) -> Confidence | None:
    """Conformal p-values of ``score`` among the good and the defect evidence; None without good evidence.

    Why these: the leave-one-out score of each good image is what a good part scores against a memory that has
    not seen it, so a new good part's score is exchangeable with them and ``good_p_value`` = (k + 1) / (n + 1),
    k of the n good images scoring at least as high, is a distribution-free answer to "how often does a good part
    score this high" — with no model of the score's law. Each good image counts once, by its highest view
    (``images_above``'s grouping), and a leave-one-out memory lacks one image, so good scores are, if anything,
    high: the value errs towards doubting a flag. Its floor is 1 / (n + 1): with 4 shots no score can look rarer
    than 20 % among good parts, which is all 4 photos can say. ``defect_p_value`` mirrors it on the defect
    evidence (confirmed defects when there are any, else the synthetic ones, which are cruder than real defects):
    how often a defect scores this low, the number that speaks against a "normal" verdict."""
    if not cal.normal_scores or not math.isfinite(score):
        return None
    maxima = np.asarray(_image_maxima(cal))
    good = float((np.count_nonzero(maxima >= score) + 1) / (maxima.size + 1))
    kind: Literal["confirmed", "synthetic"] | None = (
        "confirmed" if cal.validation_defect_scores else "synthetic" if cal.defect_scores else None)
    defects = np.asarray(cal.validation_defect_scores or cal.defect_scores, dtype=np.float64)
    defect = float((np.count_nonzero(defects <= score) + 1) / (defects.size + 1)) if defects.size else None
    return Confidence(good_p_value=good, defect_p_value=defect, good_images=int(maxima.size),
                      defect_images=int(defects.size), defect_evidence=kind)


def image_scores(cal: Calibration) -> list[list[float]]:
    """Each good image's leave-one-out scores, its own and its light views' (``normal_scores`` holds them per image
    in order; ``confirmed`` indexes this list): the one grouping the bound (``images_above``), the confidence and
    the service's score distributions count images by."""
    images = max(1, int(cal.shots or len(cal.normal_scores)))
    groups = np.array_split(np.asarray(cal.normal_scores, dtype=np.float64), images)
    return [[float(s) for s in g] for g in groups if g.size]


def _image_maxima(cal: Calibration) -> list[float]:
    """Each good image's largest leave-one-out score (``image_scores``)."""
    return [max(g) for g in image_scores(cal)]


def _auto_threshold(normal: Sequence[float], defects: Sequence[float], validation: Sequence[float],
                    shots: int, lowest: float | None = None) -> float:
    """The automatic rule: the 1 % false-alarm bound of the normals, lowered to the boundary between normal
    and defect evidence when defects are expected closer than that, never below the largest normal score
    (``lowest``: a floor chosen otherwise, ``floor``).

    The boundary is the geometric midpoint (log scores: halfway) between a typical normal score and the
    weakest decile of the defect evidence: synthetic defects made from the shots, plus any the operator
    confirmed (the weaker of the two deciles counts, so a confirmed subtle defect pulls the threshold down).
    On a product whose defects score far above its normals the bound decides and false alarms stay near the
    target; where defects are expected close to normal parts (fine texture, tiny defects) the boundary decides
    and recall is not sacrificed to a false-alarm promise the evidence cannot keep."""
    bound = threshold_for_rate(normal, DEFAULT_FALSE_ALARM_RATE, shots)
    weakest = [float(np.quantile(e, WEAK_DEFECT_QUANTILE)) for e in (defects, validation) if len(e)]
    if weakest:
        bound = min(bound, math.sqrt(max(float(np.mean(normal)), 1e-12) * max(min(weakest), 1e-12)))
    return max(bound, max(normal) if lowest is None else lowest)


def calibrate(normal_scores: Sequence[float], defect_scores: Sequence[float] = (), *, shots: int | None = None,
              validation_defect_scores: Sequence[float] = (), policy: DecisionPolicy | None = None,
              method: str = "leave-one-out", confirmed: Sequence[int] = ()) -> Calibration:
    """Choose a threshold from the evidence under ``policy`` (default: the automatic rule); ``confirmed``: the
    good images (indices, in shot order) an operator confirmed through feedback (see ``floor``)."""
    normal = [float(s) for s in normal_scores]
    if not normal:
        raise ValueError("calibration needs at least one normal score")
    if not all(math.isfinite(s) for s in normal):
        raise ValueError("calibration scores must be finite")
    mean, std = _normal_fit(normal)
    cal = Calibration(threshold=0.0, target_false_alarm_rate=None, mean=mean, std=std, max_normal=max(normal),
                      count=len(normal), method=method, normal_scores=normal,
                      defect_scores=[float(s) for s in defect_scores],
                      validation_defect_scores=[float(s) for s in validation_defect_scores],
                      shots=int(shots if shots is not None else len(normal)),
                      confirmed=sorted({int(i) for i in confirmed}))
    return apply_policy(cal, policy or DecisionPolicy())


def apply_policy(cal: Calibration, policy: DecisionPolicy) -> Calibration:
    """A copy of ``cal`` under another decision policy, with the expected rates recomputed from its evidence."""
    if policy.kind == "manual" and policy.threshold is not None:  # frozen, and set for these kinds (post_init)
        chosen = float(policy.threshold)
    elif policy.kind == "target_rate" and policy.target_false_alarm_rate is not None:
        chosen = threshold_for_rate(cal.normal_scores, policy.target_false_alarm_rate, cal.shots)
    else:
        chosen = _auto_threshold(cal.normal_scores, cal.defect_scores, cal.validation_defect_scores, cal.shots,
                                 floor(cal))
    if not math.isfinite(chosen):
        raise ValueError("calibration produced a non-finite threshold")
    rate = false_alarm_rate_at(cal, chosen)
    verdicts = policy.kind == "manual" or rate is not None
    confident = rate is not None and rate <= CONFIDENT_FALSE_ALARM_BOUND
    return replace(cal, threshold=chosen, policy=policy.kind, target_false_alarm_rate=policy.target_false_alarm_rate,
                   expected_false_alarm_rate=rate, expected_recall=recall_at(cal, chosen), confident=confident,
                   note=_note(cal, chosen, rate, verdicts), verdicts=verdicts)


def _note(cal: Calibration, threshold: float, rate: float | None, verdicts: bool) -> str | None:
    """What an operator should know about the decision's evidence, in one sentence (None when it is solid)."""
    above, images = images_above(cal, threshold) if cal.normal_scores else (0, 0)
    if not verdicts:
        return (f"{images} good image(s): no verdicts until at least {MIN_VERDICT_IMAGES} (one photo cannot show how "
                "much good parts differ); predictions carry the score only. Add shots, or set a manual threshold")
    maxima = _image_maxima(cal) if cal.normal_scores else []
    outliers = [i for i in cal.confirmed if i < len(maxima) and maxima[i] > threshold]
    if outliers:
        return (f"confirmed good image(s) {outliers} (in shot order, see GET .../shots) score above the threshold: "
                "if mislabelled, remove them (DELETE .../shots/{sha256}); if good, confirm more parts like them")
    if rate is None:
        return None
    if rate > CONFIDENT_FALSE_ALARM_BOUND:
        return (f"{images} good image(s), {above} above the threshold: up to {100 * rate:.0f} % of good parts may be "
                f"flagged ({100 * FALSE_ALARM_CONFIDENCE:.0f} % confidence); confirm good parts via feedback or add "
                "shots to tighten this")
    return None


def light_views(image: Image.Image, count: int) -> list[Image.Image]:
    """Small zooms and brightness changes a production line produces anyway; scoring them as normal widens
    the normal distribution to what the camera will really deliver.

    A zoom (crop 2 % off every side, resize back) stands in for a small shift: shifting with a fill colour
    drew a flat band along the border that no real frame has, and on textured parts that band scored like a
    defect (ball screw: light views 0.19 vs 0.12 for real good frames), pushing the threshold above them."""
    width, height = image.size
    dx, dy = max(1, width // 50), max(1, height // 50)
    box = (dx, dy, width - dx, height - dy)
    variants = [
        lambda im: im.resize(im.size, Image.Resampling.BICUBIC, box=box),
        lambda im: ImageEnhance.Brightness(im).enhance(1.05),
        lambda im: ImageEnhance.Brightness(im).enhance(0.95),
        lambda im: ImageEnhance.Contrast(im).enhance(1.05),
    ]
    rgb = image.convert("RGB")
    return [variants[i % len(variants)](rgb) for i in range(count)]
