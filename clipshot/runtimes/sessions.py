"""Open an exported graph in its runtime: a callable from a (N, 3, H, W) float32 array to the output arrays."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

Session = Callable[[np.ndarray], list[np.ndarray]]


class RuntimeUnavailable(RuntimeError):
    """The runtime's package is not installed (or lacks the requested provider); says what to install."""


def open_session(folder: Path, fmt: str, *, threads: int | None = None,
                 providers: Sequence[str] | None = None) -> Session:
    """``onnx`` runs through ONNX Runtime (``providers``: default CPU), ``openvino`` through OpenVINO on CPU.

    ``threads`` caps intra-op threads (None: the runtime's default, one per core)."""
    if fmt == "onnx":
        return _onnxruntime(folder / "model.onnx", threads, providers)
    if fmt == "openvino":
        return _openvino(folder / "model.xml", threads)
    raise ValueError(f"unknown export format {fmt!r}")


def _onnxruntime(path: Path, threads: int | None, providers: Sequence[str] | None) -> Session:
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise RuntimeUnavailable("ONNX Runtime is not installed: pip install 'clipshot[runtimes]'") from exc
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    wanted = list(providers or ["CPUExecutionProvider"])
    missing = [p for p in wanted if p not in ort.get_available_providers()]
    if missing:
        raise RuntimeUnavailable(f"ONNX Runtime here has no {', '.join(missing)} (available: "
                                 f"{', '.join(ort.get_available_providers())})")
    session = ort.InferenceSession(str(path), options, providers=wanted)
    name = session.get_inputs()[0].name

    def run(pixels: np.ndarray) -> list[np.ndarray]:
        return session.run(None, {name: np.ascontiguousarray(pixels, dtype=np.float32)})

    return run


def _openvino(path: Path, threads: int | None) -> Session:
    try:
        import openvino as ov
    except ImportError as exc:
        raise RuntimeUnavailable("OpenVINO is not installed: pip install 'clipshot[runtimes]'") from exc
    # f32 inference: on CPUs with bf16/AMX units OpenVINO otherwise runs in bf16 by default, which moves scores.
    config: dict = {"INFERENCE_PRECISION_HINT": "f32"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    compiled = ov.Core().compile_model(str(path), "CPU", config)
    request = compiled.create_infer_request()  # one per session; callers serialise (the device thread)

    def run(pixels: np.ndarray) -> list[np.ndarray]:
        result = request.infer([np.ascontiguousarray(pixels, dtype=np.float32)])
        return [np.array(result[out]) for out in compiled.outputs]  # copies: the request reuses its buffers

    return run
