"""clipshot core: frozen backbone + per-product adapters -> anomaly scores and heatmaps.

Entry points: ``load_backbone(spec)`` builds the frozen model, ``Detector(backbone)`` fits adapters
(``fit_memory``, ``text_adapter``) and scores images (``predict``).
"""

from clipshot.adapter import Adapter
from clipshot.backbone import load_backbone
from clipshot.detector import Detector
from clipshot.prediction import Prediction

__version__ = "0.1.0"
__all__ = ["Adapter", "Detector", "Prediction", "__version__", "load_backbone"]
