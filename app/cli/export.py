"""``clipshot export``: a category's feature extractor as an ONNX or OpenVINO graph, checked against PyTorch.

The graph is what a service with ``CLIPSHOT_RUNTIME=onnxruntime|openvino`` would export on the category's first
request: the bundle's backbone at its geometry's frame, DPAM as its scoring says, its LoRA folded in, dynamic
batch. It lands in the same cache (``CLIPSHOT_RUNTIME_CACHE``, else ``<store>/runtime-cache``), so a service
started afterwards finds it instead of exporting while a line waits.

``--quantize int8`` also makes the int8 post-training quantisation of that graph (ONNX Runtime's static QDQ
quantiser, per-channel weights), calibrated on the bundle's good shots only at its geometry. A bundle fitted by a
service with ``CLIPSHOT_RUNTIME_QUANTIZE=int8`` records the digest of the pixels its graph was calibrated on; its
shots are then read back exactly as that service re-makes a missing graph (``app.serving.int8_graphs``: decoded as
the fit decoded them, used only when their digest is the recorded one), so the export writes the very graph, under
the very name, the service loads. A bundle fitted on fp32 features records none: its shots are decoded at full size
(the artefact the Python API and benchmarks use, ``FeatureRuntime(..., quantize="int8")``; measured in
docs/results/int8/), and an int8 service still serves such a bundle with its fp32 graph.
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
                        "shots only. A bundle fitted with CLIPSHOT_RUNTIME_QUANTIZE=int8 gets exactly the graph that "
                        "service loads (its stored shots decoded as its fit decoded them, checked against the "
                        "calibration digest it recorded; refused if they no longer match); a bundle fitted on fp32 "
                        "features is calibrated on its shots decoded at full size, for the Python API and benchmarks "
                        "(an int8 service serves it with its fp32 graph). See docs/results/int8 for the accuracy cost")
    env_option(parser, "--store", "store", "adapter store directory")
    env_option(parser, "--runtime-cache", "<store>/runtime-cache", "folder of exported graphs")
    parser.set_defaults(func=run_export)
    return parser


def run_export(args: argparse.Namespace) -> int:
    """Load the bundle and its backbone (fp32, CPU), export, print where the graph is and how close it came."""
    from app.errors import ClipshotHTTPError
    from app.serving.int8_graphs import stored_calibrations
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
        recorded_calibration = adapter.backbone.get("calibration") if adapter.backbone else None
        if quantize is not None:
            settings = _decode_settings(store_dir, args.format, quantize)
            if recorded_calibration:
                runtime.shot_source(str(recorded_calibration),
                                    lambda: stored_calibrations(store, settings, detector, manifest))
            else:
                runtime.calibrate(backbone.preprocess(_good_shots(store, settings, manifest), adapter.geometry))
        folder = runtime.prepare_adapter(detector, adapter)
    except (StoreError, RuntimeUnavailable, ExportError, QuantizeError, ClipshotHTTPError, OSError) as exc:
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


def _decode_settings(store: Path, format_name: str, quantize: str) -> Any:
    """The service settings (environment and .env included) whose upload limits the shots are decoded under, as the
    service decodes them: a shot over this deployment's limits is refused here as it would be there."""
    from pydantic import ValidationError

    from app.core.config import Settings

    try:  # the runtime named here, so an environment that sets no runtime still validates with int8
        return Settings(store=store, runtime=RUNTIME_OF[format_name], runtime_quantize=quantize, insecure_dev=True,
                        admin_keys=[], client_keys=[], mqtt_host=None, record_mode="off")
    except ValidationError as exc:
        raise CliError("the service settings are invalid: " + "; ".join(e["msg"] for e in exc.errors())) from exc


def _good_shots(store: Any, settings: Any, manifest: Any) -> list:
    """The bundle's good shots (the memory's images), the only images an int8 graph may be calibrated on, decoded
    at full size the way every fit decodes stored shots (upright, under the upload limits)."""
    from app.categories.shot_ledger import decode_refs

    goods = [ref.model_dump(mode="json") for ref in manifest.shots if ref.label == "good"]
    if not goods:
        raise CliError(f"{manifest.category} v{manifest.version} lists no good shots to calibrate int8 on")
    return decode_refs(store, manifest.category, goods, settings)
