"""``clipshot eval``: the standard few-/zero-shot MVTec protocol, reproducible with one command.

It lives above the core because it builds adapters the way every floor does (memory fits in ``clipshot``,
fine-tunes in ``training``, generic bundles from ``model_store``); the protocol, metrics and reports it
drives stay pure in ``clipshot.evaluation``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from PIL import Image

from clipshot.backbone import PRECISION_CHOICES

MODES = ("memory", "text", "fused", "finetuned")


def _int_list(value: str) -> list[int]:
    try:
        return [int(v) for v in value.split(",") if v.strip() != ""]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from exc


class _DefaultsFormatter(argparse.HelpFormatter):
    """Shows a default where there is one to show: not for required options, unset ones (None) or help that
    already explains its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, argparse.SUPPRESS) or "default" in text or action.required:
            return text
        return f"{text} (default: %(default)s)"


def add_eval_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval", help="run the MVTec AD few-/zero-shot protocol on an MVTec-layout dataset",
        formatter_class=_DefaultsFormatter,
        description=(
            "Evaluate on <root>/<category>/{train/good,test/<defect>,ground_truth/<defect>}. For each category, "
            "seed and shot count, k shots are drawn from the sorted train/good listing (a fixed per-seed "
            "permutation, so 1-shot sets are inside 2-shot sets, ...), the same for every mode. Writes "
            "results.json, results.md, scores.csv (one line per image: score, threshold, verdict), shots.png and "
            "examples.png to --out. Decisions (accuracy, recall, false alarms, F1) use the threshold each adapter "
            "calibrated from its shots. Accuracy of the CLIP modes needs real CLIP weights (--backbone "
            "open_clip:ARCH:/path/to/weights); test:tiny-clip is a pipeline check."
        ),
    )
    parser.add_argument("--data", required=True, type=Path, help="MVTec-AD-layout root folder")
    parser.add_argument("--categories", default=None, help="comma-separated subset (default: all in --data)")
    parser.add_argument("--shots", type=_int_list, default=None,
                        help="e.g. 0,1,2,4,8,16 (default: 0,1,2,4,8,16 on CLIP, 1,2,4,8,16 on memory-only backbones)")
    parser.add_argument("--seeds", type=_int_list, default=[0, 1, 2], help="e.g. 0,1,2")
    parser.add_argument("--mode", choices=MODES, default="memory",
                        help="memory: visual memory only; text: prompts only; fused: memory + handcrafted text; "
                        "finetuned: LoRA + learned prompts + memory. 0 shots always means zero-shot.")
    parser.add_argument("--backbone", default="imagenet:efficientnet-lite0", help="backbone spec")
    parser.add_argument("--image-size", type=int, default=None, help="backbone input resolution override")
    parser.add_argument("--resize", choices=("auto", "squash", "letterbox", "native"), default="auto",
                        help="how each view is fitted into the model input (auto: the registration rule)")
    parser.add_argument("--roi", type=_int_list, default=None, help="left,top,right,bottom in image pixels")
    parser.add_argument("--tile", type=int, default=None,
                        help="square tile side in image pixels; 0 = no tiles (default: the registration rule)")
    parser.add_argument("--tile-overlap", type=float, default=0.25, help="overlap of neighbouring tiles")
    parser.add_argument("--memory-center", choices=("on", "off"), default=None,
                        help="memory distances around the shots' mean patch (on) or around the origin (off, shipped) "
                             "(memory and fused modes)")
    parser.add_argument("--memory-stages", choices=("on", "off"), default=None,
                        help="one cosine per backbone stage, averaged (on, shipped), or one cosine over the "
                             "concatenated stages (off) (ImageNet EfficientNet; CLIP layers are separate anyway)")
    parser.add_argument("--memory-stage-grids", choices=("on", "off"), default=None,
                        help="search each stage at its own stride, the stride-16 one at every other cell of the "
                             "stride-8 grid and interpolated between (on, shipped: 2.2x less search work), or at every "
                             "cell (off) (ImageNet EfficientNet with --memory-stages on)")
    parser.add_argument("--image-score", choices=("peak", "peak_mean"), default=None,
                        help="map -> image score: peak_mean (shipped: geometric mean of the map's maximum and mean) or "
                             "peak (the maximum alone)")
    parser.add_argument("--position-baseline", choices=("off", "auto", "on"), default=None,
                        help="divide maps by the normal level the shots show at each position: auto (each product "
                             "decides from its own synthetic defects), on, off (clipshot/position_baseline.py)")
    parser.add_argument("--scoring", choices=("shipped", "choose"), default="shipped",
                        help="shipped: the scoring above; choose: each product picks its memory scoring from its own "
                             "shots (clipshot/scoring_selection.py), starting from the flags above")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto", choices=PRECISION_CHOICES,
                        help="auto = bf16 on GPUs that have it, fp32 on CPU")
    parser.add_argument("--memory-precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                        help="what memory cosines are computed in: auto = bf16 on CPUs that multiply it natively, "
                             "fp32 on other CPUs, fp16 on a GPU at half precision (the service's memory_precision)")
    parser.add_argument("--generic", type=Path, default=None,
                        help="store folder whose active generic (zero-shot) bundle serves the 0-shot runs")
    parser.add_argument("--mask-size", default="full", help="full (ground-truth resolution), 256 or 518")
    parser.add_argument("--steps", type=int, default=None, help="fine-tune steps for --mode finetuned")
    parser.add_argument("--examples-per-defect", type=int, default=2,
                        help="test images of each defect type shown in examples.png")
    parser.add_argument("--feedback", type=int, default=0, metavar="N",
                        help="simulate an operator correcting the first N wrong verdicts on one half of the test "
                        "set and report decisions on the other half before/after (rule in evaluation/feedback.py)")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.set_defaults(func=run_eval)


def _adapter_factory(detector, args: argparse.Namespace):
    """Build the per-run adapter for the chosen mode; detaches the previous run's LoRA from the device."""
    generic = None
    if args.generic is not None:
        from model_store import AdapterStore
        from model_store.adapters import load_generic_adapter

        generic, _ = load_generic_adapter(AdapterStore(args.generic), detector)
    previous: list[Any] = []

    def make_adapter(shots: list[Image.Image], k: int, seed: int, *, category: str):
        for old in previous:
            detector.detach(old)
        previous.clear()
        start = time.perf_counter()
        if k == 0:
            adapter = generic or detector.text_adapter(category=category, object_name=None)
            return adapter, time.perf_counter() - start, 0.0
        if args.mode == "text":
            adapter = detector.text_adapter(category=category, object_name=category)
            return adapter, time.perf_counter() - start, 0.0
        geometry = detector.plan_geometry(  # the same rule (and overrides) as registration
            [img.size for img in shots], resize=None if args.resize == "auto" else args.resize,
            roi=tuple(args.roi) if args.roi else None, tile=args.tile, tile_overlap=args.tile_overlap)
        if args.mode in ("memory", "fused"):
            from clipshot.fusion import ScoringConfig

            fixed = {key: value for key, value in (
                ("memory_center", None if args.memory_center is None else args.memory_center == "on"),
                ("memory_stages", None if args.memory_stages is None else args.memory_stages == "on"),
                ("memory_stage_grids", None if args.memory_stage_grids is None else args.memory_stage_grids == "on"),
                ("image_score", args.image_score), ("position_baseline", args.position_baseline))
                if value is not None}
            scoring = ScoringConfig(**fixed) if fixed else None
            adapter = detector.fit_memory(shots, category=category, text=args.mode == "fused", object_name=category,
                                          geometry=geometry, scoring=scoring, choose_scoring=args.scoring == "choose")
            return adapter, time.perf_counter() - start, 0.0
        from training.fewshot import FewShotConfig, train_fewshot

        config = FewShotConfig(seed=seed) if args.steps is None else FewShotConfig(seed=seed, steps=args.steps)
        result = train_fewshot(detector, shots, category=category, object_name=category, config=config,
                               geometry=geometry)
        previous.append(result.adapter)
        fit_s = time.perf_counter() - start - result.seconds
        return result.adapter, fit_s, result.seconds

    return make_adapter


def _refiner(detector):
    """Feedback as the service applies it: confirmed goods join the memory (coreset-bounded to 16 shots' worth),
    confirmed defects become validation evidence; the adapter's LoRA, prompts and policy stay."""
    def refine(adapter, shots: list[Image.Image], goods: list[Image.Image], defects: list[Image.Image]):
        import copy

        images = shots + goods
        ratio = None if len(images) <= 16 else 16 / len(images)
        return detector.refit_memory(copy.copy(adapter), images, coreset_ratio=ratio, defects=defects,
                                     confirmed=range(len(shots), len(images)))

    return refine


def run_eval(args: argparse.Namespace) -> int:
    from clipshot.backbone import load_backbone
    from clipshot.detector import Detector
    from clipshot.evaluation import run_protocol, write_outputs

    detector = Detector(load_backbone(args.backbone, device=args.device, precision=args.precision,
                                      image_size=args.image_size), memory_precision=args.memory_precision)
    if args.shots is None:
        args.shots = [0, 1, 2, 4, 8, 16] if detector.backbone.supports_text else [1, 2, 4, 8, 16]
    if args.feedback < 0:
        raise ValueError("--feedback must be >= 0")
    if not detector.backbone.supports_text and (args.mode != "memory" or 0 in args.shots):
        raise ValueError(f"{args.backbone} supports the memory branch only: use --mode memory and shots >= 1, "
                         "or a CLIP backbone for text/fused/finetuned/zero-shot")
    categories = [c for c in args.categories.split(",") if c] if args.categories else None
    result = run_protocol(args.data, detector, _adapter_factory(detector, args), mode=args.mode,
                          categories=categories, shots=args.shots, seeds=args.seeds, mask_size=args.mask_size,
                          examples_per_defect=args.examples_per_defect, feedback=args.feedback,
                          refine_adapter=_refiner(detector))
    settings = {"backbone": detector.backbone.spec, "backbone_sha256": detector.backbone.weights_sha256,
                "image_size": detector.backbone.image_size, "device": str(detector.backbone.device),
                "precision": detector.backbone.precision, "memory_precision": detector.memory_precision,
                "geometry": {"resize": args.resize, "roi": args.roi, "tile": args.tile,
                             "tile_overlap": args.tile_overlap}}
    paths = write_outputs(args.out, result, command=["clipshot", *sys.argv[1:]], settings=settings)
    print((args.out / "results.md").read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
