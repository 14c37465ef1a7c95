"""Feature-forward speed, side by side in one run: PyTorch vs ONNX Runtime vs OpenVINO (not a test: numbers go into
the README's performance section).

Times exactly what a runtime replaces (``Backbone.extract`` on preprocessed pixels; scoring is PyTorch for all)
at batch 1 and 8, and states each runtime's worst feature difference from PyTorch on the same pixels, so a speed
is never quoted without its parity. ``--int8`` adds ONNX Runtime with static int8 post-training quantisation
calibrated on the shots only (``--shots``): measured here, never shipped by default (its accuracy has to pass
benchmarks/accuracy_suite.py first).

    python benchmarks/runtime_speed.py [--backbone imagenet:efficientnet-lite0] [--repeats 10] [--int8 --shots DIR]
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
from clipshot.runtimes.export import ONNX_FILE


def _images(count: int, size: int, shots: Path | None) -> list[Image.Image]:
    if shots is not None:
        files = sorted(p for p in shots.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp"))
        return [Image.open(f).convert("RGB") for f in (files * count)[:count]]
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(count)]


def _int8(folder: Path, calibration: np.ndarray, work: Path) -> Path:
    """Static QDQ int8 of the fp32 graph, activations calibrated on ``calibration`` (the shots' pixels)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Shots(CalibrationDataReader):
        def __init__(self) -> None:
            self.rows = iter([{"pixels": calibration[i : i + 1]} for i in range(len(calibration))])

        def get_next(self):
            return next(self.rows, None)

    out = work / "int8"
    out.mkdir(exist_ok=True)
    quantize_static(str(folder / ONNX_FILE), str(out / ONNX_FILE), Shots(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="imagenet:efficientnet-lite0")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--runtimes", nargs="+", default=["torch", "onnxruntime", "openvino"])
    parser.add_argument("--providers", nargs="+", default=None, help="ONNX Runtime providers (default: CPU)")
    parser.add_argument("--int8", action="store_true", help="also time ONNX Runtime int8 calibrated on --shots")
    parser.add_argument("--shots", type=Path, default=None, help="folder of good shots (int8 calibration, inputs)")
    args = parser.parse_args()

    try:
        import onnxruntime

        onnxruntime.set_default_logger_severity(3)  # the quantiser's graphs draw a warning per unused constant
    except ImportError:
        pass
    backbone = load_backbone(args.backbone, device="cpu", precision="fp32")
    size = backbone.image_size
    frame = (size, size)
    pixels = backbone.preprocess(_images(max(args.batches), size, args.shots))
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
        if args.int8 and name == "onnxruntime":
            quantised = _int8(folder, pixels[: min(len(pixels), 8)].numpy(), work)
            runners["onnxruntime int8"] = lambda x, _s=open_session(quantised, "onnx"): [np.concatenate(_s(x), -1)]
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
