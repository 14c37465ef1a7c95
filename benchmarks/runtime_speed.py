"""Feature-forward speed, side by side in one run: PyTorch vs ONNX Runtime vs OpenVINO (not a test: numbers go into
the README's performance section).

Times exactly what a runtime replaces (``Backbone.extract`` on preprocessed pixels; scoring is PyTorch for all)
at batch 1 and 8, and states each runtime's worst feature difference from PyTorch on the same pixels, so a speed
is never quoted without its parity. ``--int8`` adds ONNX Runtime and OpenVINO running the static int8
post-training quantisation (``clipshot.runtimes.quantize``) calibrated on the first ``--calibration`` images of
``--shots`` only, timed on the rest of that folder where it has more: never a default (its accuracy is measured by
benchmarks/accuracy_suite.py --quantize int8, docs/results/int8/).

    python benchmarks/runtime_speed.py [--backbone imagenet:efficientnet-lite0] [--repeats 10] [--int8 --shots DIR]
    python benchmarks/runtime_speed.py --int8 --shots ../shared/data/mvtec_ad/bottle/train/good --calibration 4
    python benchmarks/runtime_speed.py --providers CUDAExecutionProvider   # GPU machine: ONNX Runtime's CUDA EP
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from clipshot.backbone import load_backbone
from clipshot.runtimes import FeatureRuntime, RuntimeUnavailable, open_session
from clipshot.runtimes.quantize import quantize_int8


def _images(count: int, size: int, shots: Path | None) -> list[Image.Image]:
    if shots is not None:
        files = sorted(p for p in shots.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp"))
        return [Image.open(f).convert("RGB") for f in (files * count)[:count]]
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="imagenet:efficientnet-lite0")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--runtimes", nargs="+", default=["torch", "onnxruntime", "openvino"])
    parser.add_argument("--providers", nargs="+", default=None, help="ONNX Runtime providers (default: CPU)")
    parser.add_argument("--int8", action="store_true", help="also time int8 graphs calibrated on --shots")
    parser.add_argument("--shots", type=Path, default=None, help="folder of good shots (int8 calibration, inputs)")
    parser.add_argument("--calibration", type=int, default=4, help="shots the int8 graph is calibrated on")
    args = parser.parse_args()

    try:
        import onnxruntime

        onnxruntime.set_default_logger_severity(3)  # the quantiser's graphs draw a warning per unused constant
    except ImportError:
        pass
    backbone = load_backbone(args.backbone, device="cpu", precision="fp32")
    size = backbone.image_size
    frame = (size, size)
    if args.int8 and args.shots is None:
        parser.error("--int8 needs --shots: int8 is calibrated on good shots, never on random pixels")
    images = _images(max(args.batches) + (args.calibration if args.int8 else 0), size, args.shots)
    calibration = backbone.preprocess(images[: args.calibration]).numpy() if args.int8 else None
    pixels = backbone.preprocess(images[args.calibration:] if args.int8 else images)
    work = Path(tempfile.mkdtemp(prefix="runtime-speed-"))
    with torch.inference_mode():
        reference = torch.cat(backbone.extract(pixels).patches, dim=-1).numpy()
    print(f"# Feature forward, {args.backbone} at {size}x{size}, fp32 unless named")
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), load average {os.getloadavg()[0]:.1f} at start\n")
    print("| runtime | batch | ms/batch | ms/image | images/s | max feature diff vs torch |")
    print("|---|---:|---:|---:|---:|---:|")
    runners: dict[str, object] = {}
    for name in args.runtimes:
        if name == "torch":
            def run(x, _b=backbone):
                with torch.inference_mode():
                    return [torch.cat(_b.extract(torch.from_numpy(x)).patches, dim=-1).numpy()]
            runners[name] = run
            continue
        try:
            folder = FeatureRuntime(name, work).prepare(backbone, frame)
            session = open_session(folder, "onnx" if name == "onnxruntime" else "openvino",
                                   providers=args.providers if name == "onnxruntime" else None)
        except RuntimeUnavailable as exc:
            print(f"| {name} | - | - | - | - | unavailable: {exc} |")
            continue
        runners[name if not (args.providers and name == "onnxruntime") else f"onnxruntime {args.providers[0]}"] = (
            lambda x, _s=session: [np.concatenate(_s(x), axis=-1)])
        if calibration is not None and not args.providers:
            fmt = "onnx" if name == "onnxruntime" else "openvino"
            quantised = open_session(quantize_int8(folder, work, calibration), fmt)
            runners[f"{name} int8"] = lambda x, _s=quantised: [np.concatenate(_s(x), -1)]
    rows = []
    for batch in args.batches:
        x = np.ascontiguousarray(pixels[:batch].numpy())
        diffs = {label: float(np.abs(run(x)[0] - reference[:batch]).max()) for label, run in runners.items()}
        for run in runners.values():  # warm-up
            run(x)
        times: dict[str, list[float]] = {label: [] for label in runners}
        for _ in range(args.repeats):  # round-robin: a shared machine's load falls on every runtime alike
            for label, run in runners.items():
                start = time.perf_counter()
                run(x)
                times[label].append(time.perf_counter() - start)
        rows += [(label, batch, 1000 * statistics.median(times[label]), diffs[label]) for label in runners]
    for label, batch, ms, diff in sorted(rows, key=lambda r: (list(runners).index(r[0]), r[1])):
        print(f"| {label} | {batch} | {ms:.1f} | {ms / batch:.1f} | {1000 * batch / ms:.1f} | {diff:.1e} |")
    print(f"\nload average {os.getloadavg()[0]:.1f} at end")


if __name__ == "__main__":
    main()
