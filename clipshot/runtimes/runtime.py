"""``FeatureRuntime``: the backbone's feature forward through ONNX Runtime or OpenVINO, everything else in PyTorch.

A ``Detector`` built with a runtime hands it each batch of preprocessed pixels; the runtime answers with the same
``Features`` ``Backbone.extract`` would return (within ``export.EXPORT_TOLERANCE``), from a graph exported for
that backbone, frame, DPAM choice and folded LoRA. Graphs are exported on first use into ``cache`` (or ahead of
time by ``clipshot export``) and kept open in a small LRU of sessions.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from clipshot import lora
from clipshot.backbone import Backbone, ClipBackbone
from clipshot.features import Features
from clipshot.runtimes.export import META_FILE, ExportKey, export, export_key, lora_digest
from clipshot.runtimes.quantize import QUANTIZE, QuantizeError, calibration_digest, quantize_int8
from clipshot.runtimes.sessions import RuntimeUnavailable, Session, open_session

if TYPE_CHECKING:
    from clipshot.adapter import Adapter
    from clipshot.detector import Detector

RUNTIMES = ("torch", "onnxruntime", "openvino")
FORMAT_OF = {"onnxruntime": "onnx", "openvino": "openvino"}
OPEN_SESSIONS = 8  # frames x LoRA products kept compiled; each holds a copy of the backbone's weights
log = logging.getLogger(__name__)


class FeatureRuntime:
    """Feature extraction through ``name`` (``onnxruntime`` or ``openvino``) from graphs cached under ``cache``.

    ``quantize="int8"`` serves int8 graphs (``quantize.quantize_int8``) instead, each calibrated on the pixels
    given to ``calibrate``: the product's shots. Without a calibration an int8 runtime refuses to run, since
    calibrating on whatever arrives first (a test image) would quietly make the graph depend on it."""

    def __init__(self, name: str, cache: Path | str, *, threads: int | None = None, quantize: str | None = None):
        if name not in FORMAT_OF:
            raise ValueError(f"runtime must be one of {', '.join(FORMAT_OF)} (torch needs no FeatureRuntime), "
                             f"got {name!r}")
        if quantize is not None and quantize not in QUANTIZE:
            raise ValueError(f"quantize must be one of {', '.join(QUANTIZE)} or none, got {quantize!r}")
        self.name = name
        self.format = FORMAT_OF[name]
        self.cache = Path(cache)
        self.threads = threads
        self.quantize = quantize
        self._calibration: np.ndarray | None = None
        self.calibration_digest: str | None = None
        self._sessions: OrderedDict[str, tuple[Session, dict]] = OrderedDict()
        self._lora_digests: dict[str, str] = {}

    def calibrate(self, shots: torch.Tensor | np.ndarray) -> str:
        """Calibrate the int8 graphs from now on with ``shots`` (the product's shots preprocessed at its geometry,
        (N, 3, H, W)); returns their digest, which names the graphs made from them."""
        if self.quantize is None:
            raise ValueError(f"runtime {self.name} runs fp32 graphs: only a quantised runtime is calibrated")
        pixels = shots.detach().to("cpu", torch.float32).numpy() if isinstance(shots, torch.Tensor) else shots
        self._calibration = np.ascontiguousarray(pixels, dtype=np.float32)
        self.calibration_digest = calibration_digest(self._calibration)
        return self.calibration_digest

    def check_backbone(self, backbone: Backbone) -> None:
        """Refuse, before any request, a backbone the runtime cannot serve (exports are fp32 CPU graphs)."""
        if backbone.device.type != "cpu" or backbone.dtype != torch.float32:
            raise ValueError(f"runtime {self.name} serves the fp32 CPU backbone; this one runs {backbone.precision} "
                             f"on {backbone.device}: set device cpu and precision fp32 (or auto), or runtime torch")
        module = "onnxruntime" if self.name == "onnxruntime" else "openvino"
        if importlib.util.find_spec(module) is None:
            raise RuntimeUnavailable(f"runtime {self.name} needs the {module} package: pip install "
                                     "'clipshot[runtimes]', or set runtime torch")

    def prepare(self, backbone: Backbone, frame: tuple[int, int], *, dpam: bool = False, lora: str | None = None,
                fold: Callable[[], AbstractContextManager] = nullcontext) -> Path:
        """Export (unless cached) the graph for ``frame``; returns its folder. ``fold`` puts the LoRA in place."""
        key = export_key(backbone, frame, dpam=dpam, lora=lora)
        return self._graph(backbone, key, dpam, fold)

    def prepare_adapter(self, detector: Detector, adapter: Adapter) -> Path:
        """``prepare`` for the graph that serves ``adapter``: its geometry's frame, its DPAM choice, its LoRA."""
        frame = adapter.geometry.frame_of(detector.backbone.image_size)
        return self.prepare(detector.backbone, frame, dpam=adapter.scoring.dpam, lora=self._lora_of(adapter),
                            fold=lambda: folded(detector, adapter))

    def features(self, backbone: Backbone, pixels: torch.Tensor, *, dpam: bool = False, lora: str | None = None,
                 fold: Callable[[], AbstractContextManager] = nullcontext) -> Features:
        """What ``backbone.extract(pixels, dpam=dpam)`` returns under the LoRA ``fold`` installs."""
        key = export_key(backbone, (pixels.shape[-2], pixels.shape[-1]), dpam=dpam, lora=lora)
        run, meta = self._session(backbone, key, dpam, fold)
        outputs = [torch.from_numpy(o) for o in run(pixels.detach().to("cpu", torch.float32).numpy())]
        cls = outputs.pop(0) if meta["has_cls"] else None
        return Features(cls=cls, patches=outputs, grid=(meta["grid"][0], meta["grid"][1]))

    def adapter_features(self, detector: Detector, pixels: torch.Tensor, adapter: Adapter | None, *,
                         dpam: bool = False) -> Features:
        """``detector.features`` through this runtime: the adapter's LoRA (if any) folded into the exported graph."""
        return self.features(detector.backbone, pixels, dpam=dpam, lora=self._lora_of(adapter),
                             fold=lambda: folded(detector, adapter))

    def _lora_of(self, adapter: Adapter | None) -> str | None:
        """The adapter's LoRA digest, computed once per adapter object (hashing ~1M LoRA numbers takes a while)."""
        if adapter is None or adapter.lora is None:
            return None
        if adapter.uid not in self._lora_digests:
            if len(self._lora_digests) >= 4 * OPEN_SESSIONS:
                self._lora_digests.clear()
            self._lora_digests[adapter.uid] = lora_digest(adapter.lora.to_dict(), adapter.lora_state or {})
        return self._lora_digests[adapter.uid]

    def _session(self, backbone: Backbone, key: ExportKey, dpam: bool,
                 fold: Callable[[], AbstractContextManager]) -> tuple[Session, dict]:
        digest = key.digest() + (f"-{self.quantize}-{self.calibration_digest}" if self.quantize else "")
        if digest in self._sessions:
            self._sessions.move_to_end(digest)
            return self._sessions[digest]
        folder = self._graph(backbone, key, dpam, fold)
        entry = (open_session(folder, self.format, threads=self.threads),
                 json.loads((folder / META_FILE).read_text()))
        self._sessions[digest] = entry
        while len(self._sessions) > OPEN_SESSIONS:
            self._sessions.popitem(last=False)
        return entry

    def _graph(self, backbone: Backbone, key: ExportKey, dpam: bool,
               fold: Callable[[], AbstractContextManager]) -> Path:
        """The fp32 graph for ``key``, or its int8 quantisation on the current calibration."""
        folder = self._export(backbone, key, dpam, fold)
        if self.quantize is None:
            return folder
        if self._calibration is None:
            raise QuantizeError(f"runtime {self.name} with quantize {self.quantize} has no calibration: calibrate "
                                "it on the product's shots first")
        if tuple(self._calibration.shape[-2:]) != key.frame:
            raise QuantizeError(f"the calibration shots are {self._calibration.shape[-2]}x"
                                f"{self._calibration.shape[-1]} but the graph's frame is {key.frame[0]}x"
                                f"{key.frame[1]}: calibrate on the shots at the product's geometry")
        return quantize_int8(folder, self.cache, self._calibration)

    def _export(self, backbone: Backbone, key: ExportKey, dpam: bool,
                fold: Callable[[], AbstractContextManager]) -> Path:
        started = time.perf_counter()
        folder = export(backbone, key, self.format, self.cache, dpam=dpam, fold=fold)
        took = time.perf_counter() - started
        if took > 0.5:  # a cache hit is a stat call; anything slower was a real export
            log.info("exported %s at %dx%d%s for %s in %.1f s -> %s", key.spec, *key.frame,
                     f" (LoRA {key.lora})" if key.lora else "", self.name, took, folder)
        return folder


@contextmanager
def folded(detector: Detector, adapter: Adapter | None) -> Iterator[None]:
    """The backbone with ``adapter``'s LoRA folded into its weights (the plain backbone without one), restored after:
    the exported graph then runs the product's weights with no LoRA branch at all."""
    backbone = detector.backbone
    if not isinstance(backbone, ClipBackbone):
        yield
        return
    if adapter is None or adapter.lora is None:
        lora.activate(backbone.visual, None)
        yield
        return
    detector.attach(adapter)
    lora.activate(backbone.visual, adapter.uid, merge=True)
    try:
        yield
    finally:
        lora.activate(backbone.visual, None)
