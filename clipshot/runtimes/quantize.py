"""Static int8 post-training quantisation of an exported feature graph, calibrated on the product's shots only.

The fp32 ONNX graph of ``export.export`` is quantised by ONNX Runtime's ``quantize_static``: QDQ format (a
Quantize/Dequantize pair around every quantised op, which both ONNX Runtime and OpenVINO execute as int8 kernels),
weights int8 per output channel, activations int8 with ranges from a min/max pass over the calibration images.
The calibration images are the product's good shots at its geometry's frame (``ShotCalibrationReader``), never a
test image: a quantised graph is then as much a property of the product as its memory bank, and it is keyed by
the digest of exactly those pixels (``calibration_digest``).

The graph is kept beside its OpenVINO IR (converted from the QDQ ONNX, so OpenVINO runs the same int8 ranges).
Unlike fp32 exports, int8 features are not PyTorch's within ``EXPORT_TOLERANCE``; what they do to accuracy is
measured by ``benchmarks/accuracy_suite.py --runtime onnxruntime --quantize int8`` (docs/results/int8/).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from clipshot.runtimes.export import META_FILE, ONNX_FILE, OPENVINO_FILE, published_folder

QUANTIZE = ("int8",)
CALIBRATION_BATCH = 8  # rows per calibration step; min/max ranges do not depend on how the shots are batched


class QuantizeError(RuntimeError):
    """A graph could not be quantised (no calibration shots, quantiser missing); the message says which."""


def calibration_digest(pixels: np.ndarray) -> str:
    """Digest of the exact calibration pixels (shape and values): two products share an int8 graph only when
    their shots are the same pixels at the same frame."""
    data = np.ascontiguousarray(pixels, dtype=np.float32)
    digest = hashlib.sha256(repr(data.shape).encode())
    digest.update(data.tobytes())
    return digest.hexdigest()[:16]


def _reader_base() -> type:
    try:
        from onnxruntime.quantization import CalibrationDataReader
    except ImportError as exc:
        raise QuantizeError("int8 quantisation needs onnxruntime: pip install 'clipshot[runtimes]'") from exc
    return CalibrationDataReader


def ShotCalibrationReader(pixels: np.ndarray, input_name: str = "pixels", *,  # noqa: N802 (a class factory)
                          batch: int = CALIBRATION_BATCH) -> Any:
    """A ``CalibrationDataReader`` that hands the quantiser the shots' pixels and nothing else.

    ``pixels``: (N, 3, H, W) float32, the product's shots preprocessed at its geometry (tiles as views). The
    reader counts what it handed out in ``rows_read`` and remembers each row's digest in ``digests``, so a caller
    can check the calibration saw exactly the shots. Built by a factory because ``CalibrationDataReader`` comes
    from onnxruntime, an optional dependency."""
    base = _reader_base()
    data = np.ascontiguousarray(pixels, dtype=np.float32)
    if data.ndim != 4 or len(data) == 0:
        raise QuantizeError(f"int8 calibration needs the shots as (N, 3, H, W) pixels, got shape {data.shape}")

    class _Reader(base):  # type: ignore[misc, valid-type]  # base is onnxruntime's class, imported lazily
        def __init__(self) -> None:
            self.rows_read = 0
            self.digests: list[str] = []
            self._batches: Iterator[np.ndarray] = iter(())
            self.rewind()

        def get_next(self) -> dict[str, np.ndarray] | None:
            rows = next(self._batches, None)
            if rows is None:
                return None
            self.rows_read += len(rows)
            self.digests += [calibration_digest(row[None]) for row in rows]
            return {input_name: rows}

        def rewind(self) -> None:
            self._batches = iter([data[i : i + batch] for i in range(0, len(data), batch)])

    return _Reader()


def int8_folder(fp32_folder: Path, cache: Path, digest: str) -> Path:
    """Where the int8 graph of ``fp32_folder`` calibrated on the shots of ``digest`` lives in ``cache``."""
    return cache / f"{fp32_folder.name}-int8-{digest}"


def quantize_int8(fp32_folder: Path, cache: Path, shots: np.ndarray) -> Path:
    """Quantise ``fp32_folder``'s ONNX graph calibrated on ``shots``; returns the int8 folder (cached).

    The folder, ``<fp32 folder name>-int8-<calibration digest>`` under ``cache``, holds ``model.onnx`` (QDQ),
    ``model.xml`` (its OpenVINO IR, when OpenVINO is installed) and ``export.json`` (the fp32 meta plus what
    calibrated it). It appears atomically, like every export."""
    if shots is None or len(shots) == 0:
        raise QuantizeError("int8 calibration needs at least one shot")
    target = int8_folder(fp32_folder, cache, calibration_digest(shots))
    if (target / ONNX_FILE).is_file():
        return target
    openvino = importlib.util.find_spec("openvino") is not None
    try:
        from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError as exc:
        raise QuantizeError("int8 quantisation needs onnxruntime: pip install 'clipshot[runtimes]'") from exc
    with published_folder(cache, target, ONNX_FILE, prefix=".int8-") as work:
        prepared = work / "prepared.onnx"
        quant_pre_process(str(fp32_folder / ONNX_FILE), str(prepared), skip_symbolic_shape=True)
        reader = ShotCalibrationReader(shots)
        quantize_static(str(prepared), str(work / ONNX_FILE), reader, quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
        prepared.unlink()
        if openvino:
            import openvino as ov

            ov.save_model(ov.convert_model(str(work / ONNX_FILE)), str(work / OPENVINO_FILE), compress_to_fp16=False)
        meta = json.loads((fp32_folder / META_FILE).read_text())
        meta.update({"quantize": "int8", "calibration": {"digest": calibration_digest(shots), "rows": reader.rows_read,
                                                         "shape": list(shots.shape[1:])},
                     "max_abs_diff": None, "tolerance": None})
        (work / META_FILE).write_text(json.dumps(meta, indent=2))
    return target
