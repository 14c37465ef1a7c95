"""CPU runtimes for the backbone's feature forward: ONNX Runtime and OpenVINO, at PyTorch's scores.

Only ``Backbone.extract`` is exported (``export``); memory scoring, maps and calibration stay PyTorch. The
``Detector`` takes a ``FeatureRuntime`` and routes its feature batches through it (``runtime``).
"""

from clipshot.runtimes.export import EXPORT_TOLERANCE, FORMATS, ExportError, ExportKey, export, lora_digest
from clipshot.runtimes.runtime import FORMAT_OF, RUNTIMES, FeatureRuntime
from clipshot.runtimes.sessions import RuntimeUnavailable, open_session

__all__ = ["EXPORT_TOLERANCE", "FORMATS", "FORMAT_OF", "RUNTIMES", "ExportError", "ExportKey", "FeatureRuntime",
           "RuntimeUnavailable", "export", "lora_digest", "open_session"]
