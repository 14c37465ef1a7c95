"""What every backbone offers the scoring code: preprocessing and multi-layer patch features."""

from __future__ import annotations

import hashlib
import warnings
from abc import ABC, abstractmethod
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from clipshot.features import Features
from clipshot.geometry import REDUCING_GAP, Geometry

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PRECISION_CHOICES = ("auto", *PRECISIONS)


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` picks CUDA when present so one config works on laptops, CI and GPU servers alike."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but CUDA is not available; use 'cpu' or 'auto'")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise RuntimeError(f"device {device!r} requested but only {torch.cuda.device_count()} CUDA device(s) "
                           f"exist (cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
    return resolved


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` = bf16 on GPUs that have it, fp16 on older GPUs, fp32 on CPU.

    Explicit half precision also runs on CPU (autocast), which is how CPU-only CI exercises the GPU's
    mixed-precision code path; it is rarely faster there, so it draws a warning.
    """
    if precision == "auto":
        if device.type != "cuda":
            return "fp32"
        with torch.cuda.device(device):
            # emulated bf16 (pre-Ampere) is slow and lacks cuDNN conv kernels: count native support only
            return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISION_CHOICES)}, got {precision!r}")
    if device.type == "cpu" and precision != "fp32":
        warnings.warn(f"precision {precision} on CPU runs under autocast but is usually slower than fp32; "
                      "use it to reproduce GPU numerics, not for speed", stacklevel=3)
    return precision


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


__all__ = ["REDUCING_GAP", "Backbone", "square_resize", "unit_pixels"]


def square_resize(image: Image.Image, size: int) -> Image.Image:
    """RGB squash-resize to size x size; the one resize used by inference, calibration and training alike."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")  # convert() would copy a large RGB upload
    return rgb.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=REDUCING_GAP)


def unit_pixels(images: Sequence[Image.Image], size: int) -> torch.Tensor:
    """(N, 3, size, size) float32 in [0, 1]: what the backbone sees before normalisation (training starts here)."""
    arrays = [np.asarray(square_resize(img, size), dtype=np.float32) for img in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).div_(255.0)


class Backbone(ABC):
    """A frozen feature extractor; subclasses fill in the model-specific parts."""

    spec: str
    image_size: int
    supports_text: bool = False
    weights_sha256: str
    device: torch.device
    dtype: torch.dtype
    precision: str  # resolved: fp32, fp16 or bf16
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    layers: tuple[int, ...]
    model: torch.nn.Module  # the frozen network the features are read from
    frame_multiple: int = 16  # input sides must be multiples of this (the deepest feature stride used)

    @property
    def stage_dims(self) -> tuple[int, ...] | None:
        """Channel widths of the stages concatenated in each patch vector, or None when every layer is one stage."""
        return None

    @property
    def stage_pools(self) -> tuple[int, ...] | None:
        """Per stage of ``stage_dims``, how many patch-grid cells its own feature grid spans on each side (1 = the
        grid's resolution; 2 = a stage computed at twice the grid's stride and upsampled onto it); None as there."""
        return None

    def preprocess(self, images: Sequence[Image.Image], geometry: Geometry | None = None) -> torch.Tensor:
        """Views of the images as the category's geometry cuts them (default: squash-resize to the square
        input, no crop: a crop could cut a defect at the border), normalised: (N * views, 3, H, W)."""
        return self.normalise((geometry or Geometry()).unit_pixels(images, self.image_size))

    def normalise(self, units: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) pixels in [0, 1] -> the backbone's input on its device: the one normalisation used by
        inference, calibration's synthetic defects, training and validation."""
        units = units.to(self.device)
        mean = torch.tensor(self.mean, device=units.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=units.device).view(1, 3, 1, 1)
        return (units - mean) / std

    def autocast(self):
        """Half-precision autocast keeps fp32 LoRA weights usable next to a half backbone (CUDA or CPU)."""
        if self.dtype != torch.float32:
            return torch.autocast(self.device.type, dtype=self.dtype)
        return nullcontext()

    @abstractmethod
    def extract(self, pixels: torch.Tensor, *, dpam: bool = False) -> Features:
        """Features of a preprocessed batch."""
