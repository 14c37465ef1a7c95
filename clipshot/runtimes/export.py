"""Export a backbone's feature extractor (``Backbone.extract``) to ONNX and OpenVINO IR, checked against PyTorch.

What is exported is exactly ``extract``: the same stage taps, pooling, projection and L2 normalisation, traced at
one model frame (height, width) with a dynamic batch axis. Memory scoring, maps and calibration never leave
PyTorch, so an exported file can only change the feature vectors, and every export is compared with PyTorch on
a fixed input before it is kept (``EXPORT_TOLERANCE``).

Two numerics traps are closed here: the wrapper is put in eval mode before tracing (``torch.onnx.export`` restores
the wrapper's *training* flag afterwards, which would leave a BatchNorm backbone computing batch statistics), and
OpenVINO IR is saved with fp32 weights (``openvino.save_model`` compresses to fp16 by default).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from clipshot.backbone import Backbone

FORMATS = ("onnx", "openvino")
ONNX_FILE = "model.onnx"
OPENVINO_FILE = "model.xml"  # + model.bin beside it
META_FILE = "export.json"
OPSET = 17
# Largest |runtime - PyTorch| allowed on any component of the exported features at export time. The features are
# L2-normalised vectors (components |x| <= 1, typically ~0.05 for D ~ 300); fp32 runtimes that only reorder sums
# and fuse conv+BN differ by ~1e-6 on them (measured 4e-7 on EfficientNet-Lite0, 3e-7 on the tiny ViT). 1e-4 is
# two orders above that and two below a real export fault (a perturbed weight or batch-statistics BatchNorm moves
# components by 1e-2 and more).
EXPORT_TOLERANCE = 1e-4
CHECK_BATCH = 2  # rows of the fixed check input: exercises the dynamic batch axis at a size other than 1


class ExportError(RuntimeError):
    """An export could not be made or does not match PyTorch; the message says which and by how much."""


@dataclass(frozen=True)
class ExportKey:
    """Everything an exported graph depends on: the cache is keyed by its digest, so a stale file is never used."""

    spec: str
    weights_sha256: str
    frame: tuple[int, int]  # (height, width) of the model input: the category geometry's frame
    layers: tuple[int, ...]
    dpam_layers: tuple[int, ...]  # () when the graph runs without DPAM
    lora: str | None  # digest of the folded LoRA (``lora_digest``), None for the plain backbone
    torch_version: str = torch.__version__

    def digest(self) -> str:
        body = json.dumps(asdict(self), sort_keys=True, default=list)
        return hashlib.sha256(body.encode()).hexdigest()[:24]

    def to_dict(self) -> dict:
        return {**asdict(self), "frame": list(self.frame), "layers": list(self.layers),
                "dpam_layers": list(self.dpam_layers)}


def lora_digest(spec: dict, state: dict[str, torch.Tensor]) -> str:
    """Content hash of a LoRA (hyper-parameters + every tensor): adapters' uids change on every load, this does not."""
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode())
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:24]


def export_key(backbone: Backbone, frame: tuple[int, int], *, dpam: bool, lora: str | None) -> ExportKey:
    dpam_layers = tuple(getattr(backbone, "dpam_layers", ())) if dpam else ()
    return ExportKey(spec=backbone.spec, weights_sha256=backbone.weights_sha256, frame=(int(frame[0]), int(frame[1])),
                     layers=tuple(backbone.layers), dpam_layers=dpam_layers, lora=lora)


class _Extractor(nn.Module):
    """``backbone.extract`` as a module with tensor outputs: (cls?, patches of each layer...)."""

    def __init__(self, backbone: Backbone, dpam: bool):
        super().__init__()
        self.backbone_model = backbone.model  # registered, so eval() below reaches every BatchNorm
        self.backbone = backbone
        self.dpam = dpam

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feats = self.backbone.extract(pixels, dpam=self.dpam)
        return tuple(([] if feats.cls is None else [feats.cls]) + list(feats.patches))


def check_input(key: ExportKey) -> torch.Tensor:
    """The fixed, seeded input every export is checked on (normalised-pixel scale)."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(CHECK_BATCH, 3, *key.frame, generator=g)


def export(backbone: Backbone, key: ExportKey, fmt: str, cache: Path, *, dpam: bool,
           fold: Callable[[], AbstractContextManager] = contextlib.nullcontext) -> Path:
    """Export (if not cached) and return the folder holding ``key``'s graph in ``fmt``.

    ``fold`` is entered around tracing and the PyTorch reference: it puts the product's LoRA into the backbone's
    weights (``Detector.folded``). The folder appears atomically (written aside, then renamed), only after the
    runtime matched PyTorch on ``check_input`` within ``EXPORT_TOLERANCE``."""
    if fmt not in FORMATS:
        raise ValueError(f"export format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if backbone.device.type != "cpu" or backbone.dtype != torch.float32:
        raise ExportError(f"exports are made from the fp32 CPU backbone; this one runs {backbone.precision} on "
                          f"{backbone.device}")
    target = cache / f"{key.digest()}-{fmt}"
    if (target / _main_file(fmt)).is_file():
        return target
    with published_folder(cache, target, _main_file(fmt), prefix=".export-") as work:
        with fold(), torch.inference_mode(False), torch.no_grad():
            _trace(backbone, key, work / ONNX_FILE, dpam=dpam)
            pixels = check_input(key)
            reference = _Extractor(backbone, dpam).eval()(pixels)
        if fmt == "openvino":
            _to_openvino(work / ONNX_FILE, work / OPENVINO_FILE)
        from clipshot.runtimes.sessions import open_session

        got = open_session(work, fmt)(pixels.numpy())
        worst = max(float(np.abs(g - r.numpy()).max()) for g, r in zip(got, reference, strict=True))
        if not worst <= EXPORT_TOLERANCE:
            raise ExportError(f"{fmt} export of {key.spec} at {key.frame[0]}x{key.frame[1]} differs from PyTorch "
                              f"by {worst:.3g} (allowed {EXPORT_TOLERANCE:g}); not kept")
        meta = {"key": key.to_dict(), "format": fmt, "outputs": len(reference), "has_cls": backbone.supports_text,
                "grid": _grid(backbone, key), "max_abs_diff": worst, "tolerance": EXPORT_TOLERANCE}
        (work / META_FILE).write_text(json.dumps(meta, indent=2))
    return target


@contextlib.contextmanager
def published_folder(cache: Path, target: Path, main_file: str, *, prefix: str) -> Iterator[Path]:
    """A fresh work folder inside ``cache``, renamed to ``target`` when the block ends without an error.

    The rename is atomic, so a reader (another worker, a crash's survivor) sees a whole graph folder or none.
    When another process published ``target`` first (its ``main_file`` is there), theirs is kept and ours goes;
    on any error the work folder is removed."""
    cache.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=cache))
    try:
        yield work
        try:
            os.rename(work, target)
        except OSError:  # another process finished the same graph first: theirs is as good
            if not (target / main_file).is_file():
                raise
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)


def _main_file(fmt: str) -> str:
    return ONNX_FILE if fmt == "onnx" else OPENVINO_FILE


def _grid(backbone: Backbone, key: ExportKey) -> list[int]:
    """Feature grid of the frame: every backbone's patch features sit on a stride of ``frame / grid``."""
    stride = backbone.image_size // (backbone.grid[0] if hasattr(backbone, "grid") else 1)
    return [key.frame[0] // stride, key.frame[1] // stride]


def _trace(backbone: Backbone, key: ExportKey, path: Path, *, dpam: bool) -> None:
    """TorchScript-based ONNX export: it traces ``extract`` as run (the folded LoRA, the interpolated position table)
    in seconds on 2 cores, where the torch.export-based exporter took 3x as long on EfficientNet-Lite0."""
    module = _Extractor(backbone, dpam).eval()
    example = check_input(key)
    names = [f"features{i}" for i in range(len(module(example)))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation of this exporter, tracer notes on shape arithmetic
        torch.onnx.export(module, (example,), str(path), input_names=["pixels"], output_names=names,
                          dynamic_axes={"pixels": {0: "batch"}, **{n: {0: "batch"} for n in names}},
                          opset_version=OPSET, dynamo=False)
    if backbone.model.training:  # the exporter restores modes; a backbone left training would fail every check
        backbone.model.eval()


def _to_openvino(onnx_path: Path, xml_path: Path) -> None:
    import openvino as ov

    ov.save_model(ov.convert_model(str(onnx_path)), str(xml_path), compress_to_fp16=False)
