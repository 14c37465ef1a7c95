"""Glue between the core's ``Adapter`` and the generic bundle store: one place that maps one onto the other."""

from __future__ import annotations

import warnings
from typing import Any

from clipshot.adapter import Adapter, adapter_uid
from clipshot.detector import Detector

from .bundles import UNCHECKED
from .errors import BundleCorrupt
from .manifest import Manifest
from .store import AdapterStore


def bundle_manifest(detector: Detector, adapter: Adapter, **fields: Any) -> dict[str, Any]:
    """Partial manifest for ``adapter`` fitted on ``detector``'s backbone (store fills the rest)."""
    backbone = detector.backbone
    return {
        "backbone": {"spec": backbone.spec, "sha256": backbone.weights_sha256, "precision": backbone.precision,
                     "runtime": detector.layout()["runtime"]},
        "adapter": adapter.config(),
        **fields,
    }


def save_adapter(store: AdapterStore, detector: Detector, adapter: Adapter, *, activate: bool = True,
                 generic: bool = False, expect_active: int | None = UNCHECKED, **fields: Any) -> int:
    """Persist ``adapter`` as the next version; ``fields`` go to the manifest (shots, training, metrics, ...).

    ``expect_active``: compare-and-set on the category's active version (``AdapterStore.save``)."""
    manifest = bundle_manifest(detector, adapter, **fields)
    if generic:
        version = store.save_generic(adapter.to_tensors(), manifest, activate=activate)
    else:
        version = store.save(adapter.category, adapter.to_tensors(), manifest, activate=activate,
                             expect_active=expect_active)
    adapter.version = version
    adapter.uid = adapter_uid("g", "generic", version) if generic else adapter_uid("c", adapter.category, version)
    return version


def _to_adapter(category: str, tensors: dict, manifest: Manifest, detector: Detector) -> Adapter:
    try:
        adapter = Adapter.from_tensors(category, tensors, manifest.adapter, version=manifest.version)
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleCorrupt(f"bundle {category} v{manifest.version} does not decode into an adapter: {exc}") from exc
    detector.check_compatible(adapter)
    made_at, runs_at = manifest.backbone.precision, detector.backbone.precision
    if made_at is not None and made_at != runs_at:
        warnings.warn(f"bundle {category} v{manifest.version} was fitted and calibrated at {made_at} but this "
                      f"backbone runs {runs_at}: scores shift slightly, so verdicts near the threshold may flip. "
                      "Re-register the shots on this deployment to recalibrate.", stacklevel=3)
    quantized = adapter.backbone.get("quantize") if adapter.backbone else None
    if quantized and detector.runtime is None:  # a runtime warns itself, per adapter it serves
        warnings.warn(f"bundle {category} v{manifest.version} was fitted on {quantized} features but this service "
                      "runs PyTorch's fp32 ones: its scores can differ from its calibration by the int8 drift; "
                      "re-register or send feedback to refit it here", stacklevel=3)
    return adapter


def load_adapter(store: AdapterStore, detector: Detector, category: str,
                 version: int | None = None) -> tuple[Adapter, Manifest]:
    """Load and validate (checksum, backbone identity, layer layout) a category's bundle."""
    backbone = detector.backbone
    tensors, manifest = store.load(category, version, backbone_spec=backbone.spec,
                                   backbone_sha256=backbone.weights_sha256)
    return _to_adapter(category, tensors, manifest, detector), manifest


def load_generic_adapter(store: AdapterStore, detector: Detector,
                         version: int | None = None) -> tuple[Adapter, Manifest]:
    backbone = detector.backbone
    tensors, manifest = store.load_generic(version, backbone_spec=backbone.spec,
                                           backbone_sha256=backbone.weights_sha256)
    adapter = _to_adapter("generic", tensors, manifest, detector)
    adapter.uid = adapter_uid("g", "generic", manifest.version)
    return adapter, manifest
