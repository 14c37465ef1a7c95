"""The MVTec AD evaluation runner: categories × seeds × shot counts against one detector.

Adapter construction is injected (``make_adapter``) so the same protocol serves every mode
(memory, text, fused, fine-tuned) without knowing how adapters are built; the detector is only
used through ``Detector.predict(images, adapter, map_size=...)`` (clipshot/detector.py).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np
from PIL import Image
from tqdm import tqdm

from .dataset import (
    MaskSize,
    Sample,
    list_categories,
    list_test_samples,
    list_train_good,
    load_image,
    load_mask,
    parse_mask_size,
)
from .feedback import RefineAdapter, split_halves, wrong_verdicts
from .metrics import DEFAULT_BINS, compute_metrics
from .shots import select_shots


class PredictionLike(Protocol):
    """The part of ``clipshot.prediction.Prediction`` the protocol reads."""

    score: float
    anomaly_map: np.ndarray | None


class DetectorLike(Protocol):
    """The part of ``clipshot.detector.Detector`` the protocol calls."""

    def predict(self, images: Sequence[Image.Image], adapter: Any, *,
                map_size: tuple[int, int] | None | str = "input") -> Sequence[PredictionLike]: ...


class MakeAdapter(Protocol):
    """Build the adapter for one run; returns (adapter, fit_seconds, finetune_seconds).

    ``category`` is passed as a keyword because adapters (and text prompts) are per product.
    Zero-shot runs get ``shots == []`` and ``k == 0``.
    """

    def __call__(self, shots: list[Image.Image], k: int, seed: int, *,
                 category: str) -> tuple[Any, float, float]: ...


class Example(NamedTuple):
    """One row of examples.png: (image, bool mask, float map, title), thumbnails to bound memory."""

    image: Image.Image
    mask: np.ndarray
    amap: np.ndarray
    title: str
    threshold: float | None = None


@dataclass
class ProtocolResult:
    """Raw per-run records (see ``report``), example triples and the settings that produced them."""

    records: list[dict[str, Any]] = field(default_factory=list)
    examples: list[Example] = field(default_factory=list)
    scores: list[dict[str, Any]] = field(default_factory=list)  # one row per image and run (scores.csv)
    settings: dict[str, Any] = field(default_factory=dict)


def run_protocol(root: str | Path, detector: DetectorLike, make_adapter: MakeAdapter, *, mode: str,
                 categories: Sequence[str] | None = None, shots: Sequence[int] = (0, 1, 2, 4, 8, 16),
                 seeds: Sequence[int] = (0, 1, 2), mask_size: MaskSize | str = "full",
                 batch_size: int = 16, examples_per_defect: int = 1, example_shots: int | None = None,
                 repeat_zero_shot: bool = False, aupro_bins: int | None = DEFAULT_BINS,
                 progress: bool = True, feedback: int = 0,
                 refine_adapter: RefineAdapter | None = None) -> ProtocolResult:
    """Evaluate every (category, seed, shots) combination and collect metrics, timings, examples.

    * Shots come from ``shots.select_shots`` (nested per seed, identical for every mode).
    * ``mask_size="full"`` scores maps at each image's native size (``map_size="input"``); an int
      ``s`` asks the detector for ``(s, s)`` maps and resizes masks to match (nearest).
    * Zero-shot (0 in ``shots``) runs once, with the first seed, unless ``repeat_zero_shot``: the
      shot set is empty for every seed, so repeats would only re-measure timing noise.
    * ms/image times ``detector.predict`` only (images are decoded once per category beforehand).
    * Examples: the first ``examples_per_defect`` test images of each defect type, from the run
      with the first seed and ``example_shots`` (default: the largest shot count).
    * ``feedback`` > 0 (needs ``refine_adapter``): after each run with a threshold, the operator simulation of
      ``feedback.py`` adds records of mode ``<mode>+feedback<N>:before`` / ``:after`` on the held-out half.
    """
    if feedback and refine_adapter is None:
        raise ValueError("feedback simulation needs refine_adapter")
    size = parse_mask_size(mask_size)
    shot_list, seed_list = sorted({int(k) for k in shots}), [int(s) for s in seeds]
    if not shot_list or not seed_list or shot_list[0] < 0:
        raise ValueError("need at least one seed and one non-negative shot count")
    available = list_categories(root)
    cats = list(categories) if categories else available
    missing = sorted(set(cats) - set(available))
    if missing:
        raise ValueError(f"unknown categories {missing}; available: {', '.join(available)}")
    example_k = shot_list[-1] if example_shots is None else int(example_shots)
    if example_k not in shot_list:
        raise ValueError(f"example_shots={example_k} is not one of the evaluated shot counts {shot_list}")
    map_size: str | tuple[int, int] = "input" if size == "full" else (size, size)
    plan = [(c, s, k) for c in cats for s in seed_list for k in shot_list
            if k > 0 or repeat_zero_shot or s == seed_list[0]]
    result = ProtocolResult(settings={
        "data_root": str(root), "mode": mode, "categories": cats, "shots": shot_list,
        "seeds": seed_list, "mask_size": size, "map_size": map_size, "batch_size": batch_size,
        "repeat_zero_shot": repeat_zero_shot, "aupro_max_fpr": 0.3, "aupro_bins": aupro_bins,
        "aupro_connectivity": 8, "shot_rule": "random.Random(f'{category}:{seed}').shuffle(sorted "
        "train/good names)[:k]"})
    bar = tqdm(total=len(plan), desc="eval", unit="run", disable=not progress)
    try:
        for cat in cats:
            runs = [(s, k) for c, s, k in plan if c == cat]
            _run_category(result, root, cat, runs, detector, make_adapter, mode=mode, size=size,
                          map_size=map_size, batch_size=batch_size, aupro_bins=aupro_bins,
                          example_run=(seed_list[0], example_k), examples_per_defect=examples_per_defect,
                          bar=bar, feedback=feedback, refine_adapter=refine_adapter)
    finally:
        bar.close()
    return result


def _run_category(result: ProtocolResult, root: str | Path, cat: str, runs: list[tuple[int, int]],
                  detector: DetectorLike, make_adapter: MakeAdapter, *, mode: str, size: MaskSize,
                  map_size: str | tuple[int, int], batch_size: int, aupro_bins: int | None,
                  example_run: tuple[int, int], examples_per_defect: int, bar: tqdm, feedback: int = 0,
                  refine_adapter: RefineAdapter | None = None) -> None:
    train = list_train_good(root, cat)
    samples = list_test_samples(root, cat)
    images = [load_image(s.path) for s in samples]
    masks = [load_mask(s, size) for s in samples]
    labels = [s.label for s in samples]
    for seed, k in runs:
        bar.set_postfix_str(f"{cat} seed={seed} shots={k}")
        shot_paths = select_shots(train, k, category=cat, seed=seed)
        shot_images = [load_image(p) for p in shot_paths]
        adapter, fit_s, finetune_s = make_adapter(shot_images, k, seed, category=cat)
        levels: list[float | None] = []
        scores, maps, infer_s = predict_all(detector, images, adapter, map_size, batch_size, map_levels=levels)
        for sample, mask, amap in zip(samples, masks, maps, strict=True):
            if amap.shape != mask.shape:
                raise ValueError(f"{cat}/{sample.name}: anomaly map {amap.shape} != mask {mask.shape}; "
                                 f"map_size={map_size!r} must produce maps at the mask resolution")
        threshold = getattr(adapter, "threshold", None)
        metrics = compute_metrics(labels, scores, masks, maps, aupro_bins=aupro_bins, threshold=threshold,
                                  defects=[s.defect for s in samples])
        result.scores += [{"category": cat, "shots": k, "seed": seed, "file": s.name,
                           "label": s.label, "defect": s.defect, "score": score, "threshold": threshold,
                           "verdict": None if threshold is None else ("anomalous" if score > threshold else "normal")}
                          for s, score in zip(samples, scores, strict=True)]
        metrics.update(register_s=float(fit_s), finetune_s=float(finetune_s),
                       ms_per_image=1000.0 * infer_s / len(images))
        result.records.append({"category": cat, "mode": mode, "shots": k, "seed": seed,
                               "shot_files": [p.name for p in shot_paths], "n_test": len(samples),
                               "n_anomalous": int(sum(labels)), "metrics": metrics})
        if (seed, k) == example_run:
            result.examples += _examples(cat, samples, images, masks, maps, scores, examples_per_defect, threshold,
                                         levels)
        if feedback and threshold is not None and refine_adapter is not None:
            operator, held = split_halves(samples)
            fed = wrong_verdicts(operator, labels, scores, threshold, feedback)
            goods = [images[i] for i in fed if not labels[i]]
            defects = [images[i] for i in fed if labels[i]]
            refined = refine_adapter(adapter, shot_images, goods, defects)
            pick = [images[i] for i in held]
            after_scores, _, _ = predict_all(detector, pick, refined, map_size, batch_size)
            for phase, run_scores, thr in (
                    ("before", [scores[i] for i in held], threshold), ("after", after_scores, refined.threshold)):
                held_metrics = compute_metrics([labels[i] for i in held], run_scores, [], [], threshold=thr,
                                               pixel=False)
                held_metrics.update(fed_goods=len(goods), fed_defects=len(defects))
                result.records.append({"category": cat, "mode": f"{mode}+feedback{feedback}:{phase}", "shots": k,
                                       "seed": seed, "shot_files": [p.name for p in shot_paths], "n_test": len(held),
                                       "n_anomalous": int(sum(labels[i] for i in held)), "metrics": held_metrics,
                                       "fed_back": [samples[i].name for i in fed]})
        bar.update(1)


def predict_all(detector: DetectorLike, images: Sequence[Image.Image], adapter: Any,
                map_size: str | tuple[int, int], batch_size: int, *, map_levels: list | None = None
                ) -> tuple[list[float], list[np.ndarray], float]:
    """Scores, float32 maps and the seconds spent inside ``detector.predict`` over all batches; each image's
    ``map_threshold`` (the map level that made its verdict) is appended to ``map_levels`` when given."""
    scores: list[float] = []
    maps: list[np.ndarray] = []
    elapsed = 0.0
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        t0 = time.perf_counter()
        preds = detector.predict(batch, adapter, map_size=map_size)
        elapsed += time.perf_counter() - t0
        if len(preds) != len(batch):
            raise ValueError(f"detector returned {len(preds)} predictions for {len(batch)} images")
        for p in preds:
            if p.anomaly_map is None:
                raise ValueError("the protocol needs anomaly maps; predict returned anomaly_map=None")
            scores.append(float(p.score))
            maps.append(np.asarray(p.anomaly_map, dtype=np.float32))
            if map_levels is not None:
                map_levels.append(getattr(p, "map_threshold", getattr(p, "threshold", None)))
    return scores, maps, elapsed


def _thumbnail(image: Image.Image, mask: np.ndarray, amap: np.ndarray, side: int = 256
               ) -> tuple[Image.Image, np.ndarray, np.ndarray]:
    img = image.copy()
    img.thumbnail((side, side))
    small_mask = Image.fromarray(mask.astype(np.uint8) * 255).resize(img.size, Image.Resampling.NEAREST)
    small_map = Image.fromarray(amap.astype(np.float32)).resize(img.size, Image.Resampling.BILINEAR)
    return img, np.asarray(small_mask) > 0, np.asarray(small_map, dtype=np.float32)


def _examples(cat: str, samples: list[Sample], images: list[Image.Image], masks: list[np.ndarray],
              maps: list[np.ndarray], scores: list[float], per_defect: int,
              threshold: float | None, levels: list[float | None]) -> list[Example]:
    """First ``per_defect`` images of each defect type with score, threshold and verdict in the title; maps are
    kept in score units so the plot can use the service overlay's colour scale (anchored at each image's map
    threshold, the level that made its verdict, as in a predict response)."""
    taken: dict[str, int] = {}
    out = []
    for i, sample in enumerate(samples):
        if taken.get(sample.defect, 0) >= per_defect:
            continue
        taken[sample.defect] = taken.get(sample.defect, 0) + 1
        img, mask, amap = _thumbnail(images[i], masks[i], maps[i])
        verdict = "" if threshold is None else (" ANOMALOUS" if scores[i] > threshold else " normal")
        limit = "" if threshold is None else f" thr={threshold:.3f}"
        title = f"{cat} {sample.name} score={scores[i]:.3f}{limit}{verdict}"
        out.append(Example(img, mask, amap, title, levels[i]))
    return out
