"""``clipshot export``: a category's feature extractor as an ONNX or OpenVINO graph, checked against PyTorch.

The graph is what a service with ``CLIPSHOT_RUNTIME=onnxruntime|openvino`` would export on the category's first
request: the bundle's backbone at its geometry's frame, DPAM as its scoring says, its LoRA folded in, dynamic
batch. It lands in the same cache (``CLIPSHOT_RUNTIME_CACHE``, else ``<store>/runtime-cache``), so a service
started afterwards finds it instead of exporting while a line waits.

``--quantize int8`` also makes the int8 post-training quantisation of that graph (ONNX Runtime's static QDQ
quantiser, per-channel weights), calibrated on the bundle's good shots only at its geometry (the artefact the
Python API and benchmarks use, ``FeatureRuntime(..., quantize="int8")``; measured in docs/results/int8/). A service
with ``CLIPSHOT_RUNTIME_QUANTIZE=int8`` makes its products' int8 graphs itself when it fits them
(``app.serving.int8_graphs``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from app.cli.common import CliError, env_option

FORMATS = ("onnx", "openvino")  # = clipshot.runtimes.FORMATS (no torch import to build the parser)
RUNTIME_OF = {"onnx": "onnxruntime", "openvino": "openvino"}
QUANTIZE = ("none", "int8")  # = clipshot.runtimes.quantize.QUANTIZE plus "none"


def register(subparsers: Any, name: str, help_text: str) -> argparse.ArgumentParser:
    """Register ``export`` on the console script's subparsers."""
    parser = subparsers.add_parser(
        name, help=help_text,
        description="Export a category's feature extractor (its bundle's backbone at its geometry's frame, DPAM "
        "as its scoring says, its LoRA folded in, dynamic batch) for ONNX Runtime or OpenVINO, check it against "
        "PyTorch on a fixed input, and store it in the runtime cache a service with CLIPSHOT_RUNTIME uses.",
    )
    parser.add_argument("--category", required=True, help="product whose active (or --version) bundle to export")
    parser.add_argument("--format", required=True, choices=FORMATS, help="onnx (ONNX Runtime) or openvino (IR)")
    parser.add_argument("--version", type=int, default=None, help="bundle version (default: the active one)")
    parser.add_argument("--quantize", choices=QUANTIZE, default="none",
                        help="int8: also write the graph's static int8 quantisation, calibrated on the bundle's good "
                        "shots only (opt-in; see docs/results/int8 for what it costs in accuracy)")
    env_option(parser, "--store", "store", "adapter store directory")
    env_option(parser, "--runtime-cache", "<store>/runtime-cache", "folder of exported graphs")
    parser.set_defaults(func=run_export)
    return parser


def run_export(args: argparse.Namespace) -> int:
    """Load the bundle and its backbone (fp32, CPU), export, print where the graph is and how close it came."""
    from clipshot.backbone import load_backbone
    from clipshot.detector import Detector
    from clipshot.runtimes import ExportError, FeatureRuntime, RuntimeUnavailable
    from clipshot.runtimes.export import META_FILE
    from clipshot.runtimes.quantize import QuantizeError
    from model_store import AdapterStore
    from model_store.adapters import load_adapter
    from model_store.errors import StoreError

    store_dir = Path(args.store).expanduser()
    if not store_dir.is_dir():
        raise CliError(f"--store {store_dir} is not a directory")
    cache = store_dir / "runtime-cache" if args.runtime_cache == "<store>/runtime-cache" else Path(args.runtime_cache)
    store = AdapterStore(store_dir)
    try:
        manifest = store.manifest(args.category, args.version)
        recorded = manifest.adapter.get("backbone") or {}
        backbone = load_backbone(manifest.backbone.spec, device="cpu", precision="fp32",
                                 image_size=recorded.get("image_size"))
        quantize = None if args.quantize == "none" else args.quantize
        runtime = FeatureRuntime(RUNTIME_OF[args.format], cache.expanduser(), quantize=quantize)
        detector = Detector(backbone, runtime=runtime)
        adapter, manifest = load_adapter(store, detector, args.category, args.version)
        if quantize is not None:
            runtime.calibrate(backbone.preprocess(_good_shots(store, manifest), adapter.geometry))
        folder = runtime.prepare_adapter(detector, adapter)
    except (StoreError, RuntimeUnavailable, ExportError, QuantizeError, OSError) as exc:
        raise CliError(str(exc)) from exc
    meta = json.loads((folder / META_FILE).read_text())
    frame = meta["key"]["frame"]
    print(f"category:      {args.category} v{manifest.version}")
    print(f"backbone:      {backbone.spec} at {frame[0]}x{frame[1]}"
          + (f", LoRA {meta['key']['lora']} folded" if meta["key"]["lora"] else ""))
    print(f"graph:         {folder / ('model.onnx' if args.format == 'onnx' else 'model.xml')}")
    if meta.get("quantize"):
        print(f"quantised:     {meta['quantize']}, calibrated on {meta['calibration']['rows']} shot views only")
    else:
        print(f"vs PyTorch:    max |diff| {meta['max_abs_diff']:.2g} (allowed {meta['tolerance']:g})")
    return 0


def _good_shots(store: Any, manifest: Any) -> list:
    """The bundle's good shots (the memory's images), the only images an int8 graph may be calibrated on."""
    from PIL import Image

    names = [ref.name for ref in manifest.shots if ref.label == "good"]
    if not names:
        raise CliError(f"{manifest.category} v{manifest.version} lists no good shots to calibrate int8 on")
    images = []
    for name in names:
        with Image.open(store.shot_path(manifest.category, name)) as img:
            images.append(img.convert("RGB"))
    return images
