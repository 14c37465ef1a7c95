"""Per-product int8 graphs in the service: found in the runtime cache, else re-made from the product's stored shots.

Why: with ``runtime_quantize=int8`` a product's features come from an int8 graph calibrated on exactly its shots
(``FeatureRuntime.calibrate_adapter``, at fit time), and its memory bank and threshold were made from that graph.
After a restart, or on a replica with an empty cache, the graph is re-made from the shot files the bundle's version
lists, decoded as its fit decoded them, and only when their pixels have the digest the bundle recorded: a graph
calibrated on anything else would quietly serve other features than the threshold was set on. The graph is made
when the adapter is loaded (on the device worker, like every export), so a product whose shots are gone is refused
with a clear error before any of its images joins a batch with other products'.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from app.categories.shot_ledger import decode_refs, stored_sizes
from app.core.config import Settings
from app.errors import ConflictError
from app.serving.device_worker import PREDICT, DeviceWorker
from clipshot.adapter import Adapter
from clipshot.detector import Detector
from clipshot.geometry import Geometry
from clipshot.runtimes.quantize import QuantizeError
from model_store import AdapterStore, StoreError
from model_store.manifest import Manifest

Prepare = Callable[[Adapter, Manifest], None]


def stored_calibrations(store: AdapterStore, settings: Settings, detector: Detector,
                        manifest: Manifest) -> Iterator[np.ndarray]:
    """The pixels a fit of ``manifest``'s version may have calibrated on, most likely first: its good shots at the
    working size a registration or feedback refit decodes them at (``decode_for_fit``), then at full size (a
    fine-tune's decode; where the working size divides the image evenly both give the same pixels). The caller
    keeps the one whose digest the bundle recorded, never another."""
    goods = [r.model_dump(mode="json") for r in manifest.shots if r.label == "good"]
    if not goods:
        raise QuantizeError(f"{manifest.category} v{manifest.version} lists no good shots to calibrate int8 on")
    raw = manifest.adapter.get("geometry")
    geometry = Geometry.from_dict(raw) if raw else Geometry()
    size = detector.backbone.image_size
    defects = [r.model_dump(mode="json") for r in manifest.validation]
    factor = geometry.working_factor(stored_sizes(store, manifest.category, goods + defects, settings), size)
    for reduce in dict.fromkeys((factor, 1)):
        images = decode_refs(store, manifest.category, goods, settings, reduce=reduce)
        yield detector.backbone.preprocess(images, geometry.scaled(reduce)).numpy()


def int8_preparer(settings: Settings, store: AdapterStore, detector: Detector,
                  worker: DeviceWorker) -> Prepare | None:
    """What the adapter cache runs on each bundle it loads (None where the runtime serves no int8 graphs)."""
    runtime = detector.runtime
    if runtime is None or runtime.quantize is None:
        return None

    def prepare(adapter: Adapter, manifest: Manifest) -> None:
        digest = adapter.backbone.get("calibration") if adapter.backbone else None
        if not digest:
            return  # fitted without int8: served by its fp32 graph (the runtime warns once)
        runtime.shot_source(str(digest), lambda: stored_calibrations(store, settings, detector, manifest))

        def make() -> None:
            try:
                runtime.prepare_adapter(detector, adapter)
            finally:
                detector.detach(adapter)  # a LoRA folded for the export leaves no slot under this load's uid

        try:
            worker.submit(make, priority=PREDICT).result()
        except (QuantizeError, StoreError) as exc:
            raise ConflictError(f"category {manifest.category!r} v{manifest.version} cannot be served: its int8 "
                                f"graph is not in the runtime cache and cannot be re-made: {exc}",
                                code="int8_graph_unavailable") from exc

    return prepare
