"""Self-supervised ViTs (DINOv2 / DINOv3, built by timm) as memory-branch backbones, weights from a local file.

Why: the few-shot state of the art scores DINOv2 patch features against a memory of normal patches (AnomalyDINO,
SubspaceAD); CLIP's patch tokens are trained for image-text alignment, not for dense correspondence. These
backbones have no text tower, so a category on them is memory-only, exactly like the EfficientNets.

Architectures are data: one JSON per arch under ``model_configs/timm`` names the timm model, the blocks whose patch
tokens are used, the patch size and the default input size (open_clip's factory keeps its model configs the same
way). Weights are never downloaded: the spec names a local ``.safetensors`` / ``.pth`` file, read through timm's own
checkpoint filter, which accepts both timm's hub files and Meta's official DINOv2 release.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from clipshot.backbone.base import PRECISIONS, Backbone, file_sha256, resolve_device, resolve_precision
from clipshot.backbone.clip import BackboneLoadError, state_dict_sha256
from clipshot.backbone.spec import WEIGHT_SUFFIXES, BackboneSpec
from clipshot.features import Features

if TYPE_CHECKING:
    from timm.models.eva import Eva
    from timm.models.vision_transformer import VisionTransformer

CONFIG_DIR = Path(__file__).resolve().parent.parent / "model_configs" / "timm"
INSTALL_HINT = "pip install 'clipshot[vit]'"
POSITION_TABLES = 16  # grids whose resampled position table is kept (one per frame in use: tiles share one)


@dataclass(frozen=True)
class VitConfig:
    """One architecture: which timm model, which blocks' patch tokens (1-based), its patch and default input size."""

    name: str
    timm_model: str
    patch_size: int
    image_size: int
    blocks: tuple[int, ...]
    model_args: dict[str, Any] = field(default_factory=dict)


@functools.cache
def vit_configs() -> dict[str, VitConfig]:
    """Every shipped ViT architecture, by the name a spec uses (the JSON file's stem)."""
    configs = {}
    for path in sorted(CONFIG_DIR.glob("*.json")):
        data = json.loads(path.read_text())
        configs[path.stem] = VitConfig(name=path.stem, timm_model=data["timm_model"],
                                       patch_size=int(data["patch_size"]), image_size=int(data["image_size"]),
                                       blocks=tuple(int(b) for b in data["blocks"]),
                                       model_args=dict(data.get("model_args", {})))
    return configs


def vit_config(arch: str) -> VitConfig:
    configs = vit_configs()
    if arch not in configs:
        close = difflib.get_close_matches(arch, list(configs), n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise BackboneLoadError(f"unknown timm ViT architecture {arch!r}; {hint}known: {', '.join(configs)}")
    return configs[arch]


def build_vit(config: VitConfig) -> nn.Module:
    """The timm model for ``config``, randomly initialised from a fixed seed (so ``random`` always has one sha), with
    dynamic input size: timm then interpolates the position table to each frame's grid (non-square frames, tiles)."""
    try:
        import timm
    except ImportError as exc:
        raise BackboneLoadError(f"timm ViT backbones need the timm package: {INSTALL_HINT}") from exc
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(0)
        return timm.create_model(config.timm_model, pretrained=False, dynamic_img_size=True, **config.model_args)


def load_weights(model: nn.Module, spec: BackboneSpec) -> str:
    """Load the spec's local file into ``model``; returns the file's sha256 (what ``sha256sum`` prints for it).

    Every failure is one line that names the file: missing, a folder, unreadable, or weights of another shape."""
    hint = (f"pass a local .safetensors/.pth file of {spec.arch} weights ('timm:{spec.arch}:/path/to/"
            "model.safetensors'); clipshot never downloads ViT weights")
    if not spec.weights_is_path:
        raise BackboneLoadError(f"ViT weights {spec.weights!r} are not a file path: {hint}")
    path = Path(spec.weights or "")
    if path.is_dir():
        inside = sorted(p.name for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES)[:5]
        found = f" (it holds {', '.join(inside)})" if inside else ""
        raise BackboneLoadError(f"ViT weights {str(path)!r} is a directory; pass the weights file inside it{found}")
    if not path.is_file():
        raise BackboneLoadError(f"ViT weights file {str(path)!r} does not exist: {hint}")
    from timm.models import load_state_dict

    filter_fn = getattr(importlib.import_module(type(model).__module__), "checkpoint_filter_fn", None)
    try:
        state = load_state_dict(str(path), use_ema=False)
        if filter_fn is not None:  # official DINOv2 names -> timm's, position table resampled to the model's grid
            state = filter_fn(state, model)
        model.load_state_dict(state, strict=True)
    except Exception as exc:  # truncated copy, not a checkpoint at all, another architecture's weights
        first = " ".join(str(exc).split())[:240]
        raise BackboneLoadError(
            f"cannot load ViT weights {str(path)!r} ({path.stat().st_size} bytes) as {spec.arch}: "
            f"{type(exc).__name__}: {first}. The file is corrupt or truncated, or holds another architecture: "
            "copy it again and check its sha256 (clipshot info), or name the architecture it was trained as") from exc
    return file_sha256(path)


class TimmViTBackbone(Backbone):
    """A frozen timm ViT: the patch tokens of the configured blocks, each through the final LayerNorm (as DINOv2's
    own ``get_intermediate_layers(norm=True)``), L2-normalised; no CLS, no text tower (memory branch only)."""

    supports_text = False
    model: VisionTransformer | Eva  # DINOv2 is timm's VisionTransformer, DINOv3 its Eva (RoPE)

    def __init__(self, model: nn.Module, config: VitConfig, *, spec: str, weights_sha256: str,
                 weights_path: str | None = None, device: str | torch.device = "cpu", precision: str = "auto",
                 image_size: int | None = None, layers: Sequence[int] | None = None):
        from timm.models.eva import Eva
        from timm.models.vision_transformer import VisionTransformer

        if not isinstance(model, VisionTransformer | Eva):
            raise BackboneLoadError(f"{config.name}: timm model {config.timm_model} is a {type(model).__name__}, "
                                    "not a VisionTransformer or Eva ViT")
        patch = tuple(model.patch_embed.patch_size)
        if patch != (config.patch_size, config.patch_size):
            raise BackboneLoadError(f"{config.name}: timm built patch size {patch}, the config says "
                                    f"{config.patch_size}; fix model_configs/timm/{config.name}.json")
        self.spec = spec
        self.config = config
        self.weights_sha256 = weights_sha256
        self.weights_path = weights_path
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.dtype = PRECISIONS[self.precision]
        self.frame_multiple = config.patch_size
        self.image_size = int(image_size or config.image_size)
        if self.image_size % self.frame_multiple:
            raise ValueError(f"{config.name} image_size must be a multiple of its patch size {self.frame_multiple}, "
                             f"got {self.image_size}")
        self.depth = len(model.blocks)
        self.layers = tuple(layers) if layers else config.blocks
        if not self.layers or min(self.layers) < 1 or max(self.layers) > self.depth:
            raise ValueError(f"layers must be 1-based block indices in 1..{self.depth}, got {self.layers}")
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        self.mean = tuple(cfg.get("mean", (0.485, 0.456, 0.406)))
        self.std = tuple(cfg.get("std", (0.229, 0.224, 0.225)))
        self.model = model.eval().requires_grad_(False).to(self.device)
        side = self.image_size // self.frame_multiple
        self.grid = (side, side)
        self._positions: dict[tuple, torch.Tensor] = {}
        self._table_model: VisionTransformer | None = None
        if isinstance(model, VisionTransformer) and model.pos_embed is not None:  # DINOv3's RoPE needs no table
            self._table_model = model
            # this instance only: timm's own forward then reads each grid's table from ``positions``
            model._pos_embed = self._pos_embed  # type: ignore[method-assign]  # the one hook timm's forward offers

    @classmethod
    def load(cls, spec: BackboneSpec, *, device: str = "cpu", precision: str = "auto", image_size: int | None = None,
             layers: Sequence[int] | None = None) -> TimmViTBackbone:
        """Build ``timm:<arch>:<file>`` (or ``:random``, seeded, for speed tests only) without touching the network."""
        config = vit_config(spec.arch)
        model = build_vit(config)
        if spec.weights is None:
            sha, path = state_dict_sha256(model), None
        else:
            sha, path = load_weights(model, spec), str(Path(spec.weights).resolve())
        return cls(model, config, spec=str(spec), weights_sha256=sha, weights_path=path, device=device,
                   precision=precision, image_size=image_size, layers=layers)

    def positions(self, grid: tuple[int, int]) -> torch.Tensor:
        """The position table for a (rows, cols) patch grid, resampled by timm's own function (bicubic, antialiased)
        once per grid and kept: exported graphs then hold the table as a constant (ONNX has no antialiased bicubic
        resize), and the PyTorch path computes it once instead of on every forward."""
        model = self._table_model
        assert model is not None and model.pos_embed is not None  # only installed on a ViT with a table
        pos = model.pos_embed
        key = (grid, pos.dtype, pos.device)
        if key not in self._positions:
            from timm.layers import resample_abs_pos_embed

            if len(self._positions) >= POSITION_TABLES:
                self._positions.clear()
            prefix = 0 if model.no_embed_class else model.num_prefix_tokens
            with torch.no_grad():
                self._positions[key] = resample_abs_pos_embed(pos, new_size=list(grid),
                                                              old_size=list(model.patch_embed.grid_size),
                                                              num_prefix_tokens=prefix).detach()
        return self._positions[key]

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        """timm ``VisionTransformer._pos_embed`` for a dynamic-size (B, H, W, C) patch grid, its table from
        ``positions``."""
        model = self._table_model
        assert model is not None
        batch, rows, cols, width = x.shape
        prefix = [t.expand(batch, -1, -1) for t in (model.cls_token, model.reg_token) if t is not None]
        pos = self.positions((int(rows), int(cols))).to(x.dtype)
        x = x.reshape(batch, rows * cols, width)
        # no_embed_class: the table covers the patches only (prefix tokens carry their own position)
        x = torch.cat([*prefix, x + pos], dim=1) if model.no_embed_class else torch.cat([*prefix, x], dim=1) + pos
        return model.pos_drop(x)

    def extract(self, pixels: torch.Tensor, *, dpam: bool = False) -> Features:
        if dpam:
            raise ValueError(f"DPAM needs a CLIP backbone; {self.spec} is a self-supervised ViT")
        height, width = pixels.shape[-2:]
        if height % self.frame_multiple or width % self.frame_multiple:
            raise ValueError(f"input {height}x{width} is not a multiple of the patch size {self.frame_multiple}")
        with self.autocast():  # intermediates_only: the return is the list of (B, C, rows, cols) block maps
            maps = cast(list[torch.Tensor], self.model.forward_intermediates(
                pixels, indices=[b - 1 for b in self.layers], norm=True, output_fmt="NCHW", intermediates_only=True,
                stop_early=True))
        patches = [F.normalize(m.float().flatten(2).transpose(1, 2), dim=-1) for m in maps]
        return Features(cls=None, patches=patches, grid=(maps[0].shape[-2], maps[0].shape[-1]))
