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
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from clipshot import lora
from clipshot.backbone import Backbone, ClipBackbone
from clipshot.features import Features
from clipshot.runtimes.export import META_FILE, ONNX_FILE, ExportKey, export, export_key, lora_digest
from clipshot.runtimes.quantize import QUANTIZE, QuantizeError, calibration_digest, int8_folder, quantize_int8
from clipshot.runtimes.sessions import RuntimeUnavailable, Session, open_session

if TYPE_CHECKING:
    from clipshot.adapter import Adapter
    from clipshot.detector import Detector

RUNTIMES = ("torch", "onnxruntime", "openvino")
FORMAT_OF = {"onnxruntime": "onnx", "openvino": "openvino"}
OPEN_SESSIONS = 8  # frames x LoRA products kept compiled; each holds a copy of the backbone's weights
KEPT_SOURCES = 256  # products whose calibration shots the runtime knows how to read back (a closure each)
FP32 = "fp32"  # ``calibration`` that asks a quantised runtime for the plain fp32 graph
ShotSource = Callable[[], Iterable[np.ndarray]]  # candidate calibration pixels of a product, read back from its store
log = logging.getLogger(__name__)


class FeatureRuntime:
    """Feature extraction through ``name`` (``onnxruntime`` or ``openvino``) from graphs cached under ``cache``.

    ``quantize="int8"`` serves int8 graphs (``quantize.quantize_int8``) instead, each calibrated on one product's
    shots: a quantised graph is as much the product's as its memory bank. ``calibrate_adapter`` (called by the
    detector's fits before any shot is embedded) records the digest of the shots' pixels in the adapter, and every
    forward for that adapter then runs the graph ``(export key, calibration digest)`` names. A graph missing from
    the cache (a restart, another replica) is re-made from the pixels a ``shot_source`` reads back, used only when
    their digest is the recorded one. ``calibrate`` sets one calibration for adapters that record none (the
    benchmarks score PyTorch-fitted adapters that way). Without any calibration an int8 runtime refuses to run a
    bare ``features`` call, since calibrating on whatever arrives first (a test image) would quietly make the graph
    depend on it; an adapter fitted without int8 is served by the fp32 graph its memory was made with."""

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
        self._pixels: OrderedDict[str, np.ndarray] = OrderedDict()  # digest -> shots whose graph is not made yet
        self._sources: OrderedDict[str, ShotSource] = OrderedDict()  # digest -> how to read its shots back
        self._warned: set[str] = set()

    def calibrate(self, shots: torch.Tensor | np.ndarray) -> str:
        """Calibrate the int8 graphs from now on with ``shots`` (the product's shots preprocessed at its geometry,
        (N, 3, H, W)); returns their digest, which names the graphs made from them."""
        if self.quantize is None:
            raise ValueError(f"runtime {self.name} runs fp32 graphs: only a quantised runtime is calibrated")
        self._calibration = calibration_pixels(shots)
        self.calibration_digest = calibration_digest(self._calibration)
        return self.calibration_digest

    def calibrate_adapter(self, adapter: Adapter, shots: torch.Tensor | np.ndarray) -> str:
        """Calibrate ``adapter``'s int8 graph on ``shots`` (its shots preprocessed at its geometry, tiles as views)
        and record it in ``adapter.backbone`` (``quantize`` and the ``calibration`` digest): the fit's shot
        features, its calibration and every later prediction then come from that one graph."""
        if self.quantize is None:
            raise ValueError(f"runtime {self.name} runs fp32 graphs: only a quantised runtime is calibrated")
        pixels = calibration_pixels(shots)
        digest = calibration_digest(pixels)
        self._pixels[digest] = pixels
        while len(self._pixels) > OPEN_SESSIONS:  # fits that failed before their graph was made
            self._pixels.popitem(last=False)
        adapter.backbone = {**adapter.backbone, "quantize": self.quantize, "calibration": digest}
        return digest

    def shot_source(self, digest: str, source: ShotSource) -> None:
        """Where the shots calibrated as ``digest`` can be read back if their graph is not in the cache: ``source``
        yields candidate pixel arrays, and the first whose digest is ``digest`` is used (never another)."""
        self._sources[digest] = source
        self._sources.move_to_end(digest)
        while len(self._sources) > KEPT_SOURCES:
            self._sources.popitem(last=False)

    def served_calibration(self, adapter: Adapter | None) -> str | None:
        """The calibration digest of the graph that serves ``adapter`` (``FP32``: the fp32 graph; None: the
        runtime's own). A bundle fitted on int8 features served by fp32 ones, or the other way round, is served
        with a warning once per adapter, like a memory-precision mismatch: its threshold was set on the other
        features, so its scores can differ from its calibration by the int8 drift (~1e-2). A job's own
        unstored adapters (a fine-tune's validation banks) run the fp32 graph without a warning: both sides of its
        comparison are scored on the same fp32 features."""
        recorded = adapter.backbone.get("calibration") if adapter is not None and adapter.backbone else None
        if self.quantize is None or adapter is None:
            if recorded and adapter is not None:
                self._warn(adapter, f"was fitted on int8 features; this service runs fp32 graphs ({self.name})")
            return None
        if recorded:
            return str(recorded)
        if self.calibration_digest is not None:
            return None
        if adapter.memory is not None and adapter.version is not None:  # a stored bundle, not a job's own
            self._warn(adapter, f"was fitted on fp32 features; it is served by its fp32 graph ({self.name}), "
                       "not an int8 one")
        return FP32

    def _warn(self, adapter: Adapter, what: str) -> None:
        if adapter.uid in self._warned:
            return
        self._warned.add(adapter.uid)  # once per adapter: this runs for every batch
        warnings.warn(f"adapter {adapter.category!r} {what}, so its scores can differ from its calibration by the "
                      "int8 drift; re-register or send feedback to refit it here", stacklevel=3)

    def check_backbone(self, backbone: Backbone) -> None:
        """Refuse, before any request, a backbone the runtime cannot serve (exports are fp32 CPU graphs)."""
        if backbone.device.type != "cpu" or backbone.dtype != torch.float32:
            raise ValueError(f"runtime {self.name} serves the fp32 CPU backbone; this one runs {backbone.precision} "
                             f"on {backbone.device}: set device cpu and precision fp32 (or auto), or runtime torch")
        module = "onnxruntime" if self.name == "onnxruntime" else "openvino"
        if importlib.util.find_spec(module) is None:
            raise RuntimeUnavailable(f"runtime {self.name} needs the {module} package: pip install "
                                     "'clipshot[runtimes]', or set runtime torch")
        if self.quantize is not None and importlib.util.find_spec("onnxruntime") is None:
            raise RuntimeUnavailable(f"{self.quantize} quantisation needs the onnxruntime package: pip install "
                                     "'clipshot[runtimes]'")

    def prepare(self, backbone: Backbone, frame: tuple[int, int], *, dpam: bool = False, lora: str | None = None,
                fold: Callable[[], AbstractContextManager] = nullcontext, calibration: str | None = None) -> Path:
        """Export (unless cached) the graph for ``frame``; returns its folder. ``fold`` puts the LoRA in place."""
        key = export_key(backbone, frame, dpam=dpam, lora=lora)
        return self._graph(backbone, key, dpam, fold, calibration)

    def prepare_adapter(self, detector: Detector, adapter: Adapter) -> Path:
        """``prepare`` for the graph that serves ``adapter``: its geometry's frame, its DPAM choice, its LoRA,
        its calibration."""
        frame = adapter.geometry.frame_of(detector.backbone.image_size)
        return self.prepare(detector.backbone, frame, dpam=adapter.scoring.dpam, lora=self._lora_of(adapter),
                            fold=lambda: folded(detector, adapter), calibration=self.served_calibration(adapter))

    def graph_identity(self, adapter: Adapter) -> tuple[str | None, str | None]:
        """(LoRA digest, calibration) of the graph that serves ``adapter``: rows of a mixed batch share a forward
        only when these are equal, so no product's rows ever run through another product's int8 graph."""
        return self._lora_of(adapter), self.served_calibration(adapter)

    def features(self, backbone: Backbone, pixels: torch.Tensor, *, dpam: bool = False, lora: str | None = None,
                 fold: Callable[[], AbstractContextManager] = nullcontext,
                 calibration: str | None = None) -> Features:
        """What ``backbone.extract(pixels, dpam=dpam)`` returns under the LoRA ``fold`` installs, through the
        int8 graph calibrated as ``calibration`` (None: ``calibrate``'s; ``FP32``: the fp32 graph)."""
        key = export_key(backbone, (pixels.shape[-2], pixels.shape[-1]), dpam=dpam, lora=lora)
        run, meta = self._session(backbone, key, dpam, fold, calibration)
        outputs = [torch.from_numpy(o) for o in run(pixels.detach().to("cpu", torch.float32).numpy())]
        cls = outputs.pop(0) if meta["has_cls"] else None
        return Features(cls=cls, patches=outputs, grid=(meta["grid"][0], meta["grid"][1]))

    def adapter_features(self, detector: Detector, pixels: torch.Tensor, adapter: Adapter | None, *,
                         dpam: bool = False) -> Features:
        """``detector.features`` through this runtime: the adapter's LoRA (if any) folded into the exported graph."""
        return self.features(detector.backbone, pixels, dpam=dpam, lora=self._lora_of(adapter),
                             fold=lambda: folded(detector, adapter), calibration=self.served_calibration(adapter))

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
                 fold: Callable[[], AbstractContextManager], calibration: str | None) -> tuple[Session, dict]:
        served = self._calibration_name(calibration)
        digest = key.digest() + (f"-{self.quantize}-{served}" if served else "")
        if digest in self._sessions:
            self._sessions.move_to_end(digest)
            return self._sessions[digest]
        folder = self._graph(backbone, key, dpam, fold, calibration)
        entry = (open_session(folder, self.format, threads=self.threads),
                 json.loads((folder / META_FILE).read_text()))
        self._sessions[digest] = entry
        while len(self._sessions) > OPEN_SESSIONS:
            self._sessions.popitem(last=False)
        return entry

    def _calibration_name(self, calibration: str | None) -> str | None:
        """The calibration digest of the graph to run (None: the fp32 graph)."""
        if self.quantize is None or calibration == FP32:
            return None
        return calibration or self.calibration_digest

    def _graph(self, backbone: Backbone, key: ExportKey, dpam: bool,
               fold: Callable[[], AbstractContextManager], calibration: str | None = None) -> Path:
        """The fp32 graph for ``key``, or its int8 quantisation calibrated as ``calibration``: from the cache,
        else made from the shots known for that digest (a fit's, or read back by its ``shot_source``)."""
        folder = self._export(backbone, key, dpam, fold)
        served = self._calibration_name(calibration)
        if self.quantize is None or calibration == FP32:
            return folder
        if served is None:
            raise QuantizeError(f"runtime {self.name} with quantize {self.quantize} has no calibration: calibrate "
                                "it on the product's shots first")
        cached = int8_folder(folder, self.cache, served)
        if (cached / ONNX_FILE).is_file():
            self._pixels.pop(served, None)
            return cached
        pixels = self._calibration if served == self.calibration_digest else self._shots_of(served)
        if pixels is None:
            raise QuantizeError(f"the int8 graph calibrated as {served} is not in {self.cache} and no shots "
                                "with that digest are known to re-make it")
        if tuple(pixels.shape[-2:]) != key.frame:
            raise QuantizeError(f"the calibration shots are {pixels.shape[-2]}x{pixels.shape[-1]} but the "
                                f"graph's frame is {key.frame[0]}x{key.frame[1]}: calibrate on the shots at the "
                                "product's geometry")
        made = quantize_int8(folder, self.cache, pixels)
        self._pixels.pop(served, None)  # the graph is on disk now; the shots are read back if it goes
        return made

    def _shots_of(self, digest: str) -> np.ndarray | None:
        """The calibration pixels whose digest is ``digest``: a fit's, or the first matching candidate its
        ``shot_source`` reads back (a source that finds the shots gone raises, saying so)."""
        if digest in self._pixels:
            return self._pixels[digest]
        source = self._sources.get(digest)
        if source is None:
            return None
        for candidate in source():
            pixels = calibration_pixels(candidate)
            if calibration_digest(pixels) == digest:
                return pixels
        raise QuantizeError(f"the stored shots no longer give the pixels the int8 graph {digest} was calibrated "
                            "on (changed or re-encoded files); refit the product (feedback or re-registration)")

    def _export(self, backbone: Backbone, key: ExportKey, dpam: bool,
                fold: Callable[[], AbstractContextManager]) -> Path:
        started = time.perf_counter()
        folder = export(backbone, key, self.format, self.cache, dpam=dpam, fold=fold)
        took = time.perf_counter() - started
        if took > 0.5:  # a cache hit is a stat call; anything slower was a real export
            log.info("exported %s at %dx%d%s for %s in %.1f s -> %s", key.spec, *key.frame,
                     f" (LoRA {key.lora})" if key.lora else "", self.name, took, folder)
        return folder


def calibration_pixels(shots: torch.Tensor | np.ndarray) -> np.ndarray:
    """Calibration pixels as the quantiser reads them: (N, 3, H, W) float32, one image's views consecutive."""
    pixels = shots.detach().to("cpu", torch.float32).numpy() if isinstance(shots, torch.Tensor) else shots
    if pixels.ndim == 5:
        pixels = pixels.reshape(-1, *pixels.shape[2:])
    return np.ascontiguousarray(pixels, dtype=np.float32)


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
