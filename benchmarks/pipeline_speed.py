"""Inference speed of the whole scoring pipeline, side by side in one run: every runtime x memory precision.

``runtime_speed.py`` times what a runtime replaces (the feature forward); this times what a station waits for per
image once its pixels are decoded: ``Detector.forward`` = features + memory nearest-neighbour search + maps + image
score, for a product fitted on ``--shots`` good images of ``--category``. Runtimes are timed round-robin (a shared
machine's load falls on each alike), on ``--threads`` threads each (default 1), at batch 1 and 8, and each row
states its worst score difference from PyTorch at the same memory precision, so a speed is never quoted without its
parity. The images/s ratio is against PyTorch with fp32 memory scoring, what a CPU service ran before bf16 scoring;
``same-precision x`` is against PyTorch at the row's own memory precision (what switching only the runtime gains).
``--per-cell`` adds every row again with every stage searched at every cell of the stride-8 grid
(``memory_stage_grids=False``, the scoring before stage grids), timed in the same round-robin; its parity and ratios
are against its own PyTorch rows.

    python benchmarks/pipeline_speed.py --data ../shared/data/mvtec_ad --category bottle [--repeats 8]
    python benchmarks/pipeline_speed.py --data ../shared/data/bsdata --category ball_screw --int8
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

from clipshot.backbone import load_backbone
from clipshot.detector import Detector
from clipshot.evaluation.dataset import list_test_samples, list_train_good, load_image
from clipshot.evaluation.shots import select_shots
from clipshot.fusion import ScoringConfig
from clipshot.memory_branch import native_bf16
from clipshot.runtimes import FeatureRuntime, RuntimeUnavailable

PER_CELL = " per-cell"


def _detectors(args: argparse.Namespace, backbone, work: Path) -> dict[str, Detector]:
    """One detector per (runtime, memory precision) row, all on one backbone object."""
    precisions = ["fp32", "bf16"] if native_bf16("cpu") or args.emulated_bf16 else ["fp32"]
    out: dict[str, Detector] = {}
    for precision in precisions:
        for name, tag in [(n, t) for t in (["", PER_CELL] if args.per_cell else [""]) for n in args.runtimes]:
            quantize = [None, "int8"] if args.int8 and name != "torch" else [None]
            for q in quantize:
                label = f"{name}{' int8' if q else ''}{tag} | {precision}"
                try:
                    runtime = None if name == "torch" else FeatureRuntime(name, work, quantize=q,
                                                                          threads=args.threads)
                    out[label] = Detector(backbone, runtime=runtime, memory_precision=precision)
                except RuntimeUnavailable as exc:
                    print(f"{label}: unavailable ({exc})")
    return out


def _torch_row(label: str, precision: str | None = None) -> str:
    """The PyTorch row a row is compared with: same scoring, its own memory precision unless given."""
    name, own = label.split(" | ")
    return f"torch{PER_CELL if name.endswith(PER_CELL) else ''} | {precision or own}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="dataset root in MVTec layout")
    parser.add_argument("--category", required=True)
    parser.add_argument("--backbone", default="imagenet:efficientnet-lite0")
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--runtimes", nargs="+", default=["torch", "onnxruntime", "openvino"])
    parser.add_argument("--int8", action="store_true",
                        help="also int8 graphs, each calibrated on this product's shots only (opt-in export)")
    parser.add_argument("--emulated-bf16", action="store_true",
                        help="time bf16 memory scoring even where the CPU has no native bf16 (it is then slower)")
    parser.add_argument("--per-cell", action="store_true",
                        help="also time every stage searched at every grid cell (memory_stage_grids off, the scoring "
                             "before stage grids), side by side")
    parser.add_argument("--threads", type=int, default=1,
                        help="threads of every runtime and of PyTorch (default 1: per-core speed, and runtimes that "
                             "share one process do not starve each other's thread pools)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    backbone = load_backbone(args.backbone, device="cpu", precision="fp32")
    shots = [load_image(p) for p in select_shots(list_train_good(args.data, args.category), args.shots,
                                                 category=args.category, seed=0)]
    samples = list_test_samples(args.data, args.category)
    step = max(1, len(samples) // max(args.batches))
    images = [load_image(s.path) for s in samples[::step][: max(args.batches)]]
    detectors = _detectors(args, backbone, Path(tempfile.mkdtemp(prefix="pipeline-speed-")))
    adapters = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for label, detector in detectors.items():
            if detector.runtime is not None and detector.runtime.quantize:
                geometry = detector.resolve_geometry(None, [s.size for s in shots])
                detector.runtime.calibrate(backbone.preprocess(shots, geometry))
            scoring = ScoringConfig(memory_stage_grids=PER_CELL not in label)
            adapters[label] = detector.fit_memory(shots, category=args.category, scoring=scoring)
    geometry = next(iter(adapters.values())).geometry
    pixels = backbone.preprocess(images, geometry)

    print(f"# Scoring pipeline (features + memory search + maps), {args.backbone}, {args.category}, "
          f"{args.shots} shots, frame {geometry.frame_of(backbone.image_size)}")
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), native bf16: {native_bf16('cpu')}, load average "
          f"{os.getloadavg()[0]:.1f} at start\n")
    times: dict[tuple[str, int], list[float]] = {}
    diffs: dict[tuple[str, int], float] = {}
    for batch in args.batches:
        x = pixels[:batch]
        scores = {label: d.forward(x, adapters[label])[0] for label, d in detectors.items()}  # warm-up + parity
        for label in detectors:
            reference = scores[_torch_row(label)]
            diffs[label, batch] = float((scores[label] - reference).abs().max())
        for _ in range(args.repeats):
            for label, detector in detectors.items():
                start = time.perf_counter()
                detector.forward(x, adapters[label])
                times.setdefault((label, batch), []).append(time.perf_counter() - start)
    print("| runtime | memory | batch | ms / image | images / s | vs torch fp32 | same-precision x "
          "| max score diff vs torch |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for batch in args.batches:
        for label in detectors:
            base = statistics.median(times[_torch_row(label, "fp32"), batch]) / batch
            ms = statistics.median(times[label, batch]) / batch
            same = statistics.median(times[_torch_row(label), batch]) / batch
            name, precision = label.split(" | ")
            print(f"| {name} | {precision} | {batch} | {1000 * ms:.1f} | {1 / ms:.1f} | {base / ms:.2f}x "
                  f"| {same / ms:.2f}x | {diffs[label, batch]:.1e} |")
    print(f"\nload average {os.getloadavg()[0]:.1f} at end")


if __name__ == "__main__":
    main()
