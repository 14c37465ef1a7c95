"""Frozen open_clip backbone: projected CLS + multi-layer patch tokens, optional DPAM, LoRA-ready attention."""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from clipshot.backbone.attention import split_attention
from clipshot.backbone.base import PRECISIONS, Backbone, resolve_device, resolve_precision
from clipshot.backbone.hub import hub_endpoint, hub_offline, hub_reachable, offline_requested
from clipshot.backbone.spec import EFFICIENTNET_LITE0, WEIGHT_SUFFIXES, BackboneSpec
from clipshot.features import Features

if TYPE_CHECKING:  # open_clip ships no type information: its classes read as Any, named here for the reader
    from open_clip.transformer import VisionTransformer

CONFIG_DIR = Path(__file__).resolve().parent.parent / "model_configs"
TINY_ARCH = "clipshot-tiny-clip"
_configs_registered = False


class BackboneLoadError(RuntimeError):
    """The backbone could not be built; the message says what to pass instead."""


def _register_configs() -> None:
    global _configs_registered
    if not _configs_registered:
        open_clip.add_model_config(CONFIG_DIR)
        _configs_registered = True


def state_dict_sha256(model: nn.Module) -> str:
    """Hash of every weight (names + bytes): identifies the weights however they were obtained (tag, file, seed)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def even_layers(depth: int, count: int = 4) -> tuple[int, ...]:
    """``count`` evenly spaced 1-based block indices ending at the last block (3/6/9/12 for 12 blocks)."""
    return tuple(sorted({max(1, round(depth * (i + 1) / count)) for i in range(count)}))


def create_clip_model(spec: BackboneSpec, image_size: int | None, quick_gelu: bool | None) -> nn.Module:
    """Build the open_clip model for ``spec``; every failure ends in advice on what to pass instead."""
    _register_configs()
    arch = TINY_ARCH if spec.family == "test" else spec.arch
    if arch not in open_clip.list_models():
        known = open_clip.list_models()
        close = difflib.get_close_matches(spec.arch, known, n=5, cutoff=0.6) or difflib.get_close_matches(
            spec.arch.lower(), [m.lower() for m in known], n=5, cutoff=0.4)
        hint = f"did you mean {', '.join(close)}?" if close else f"e.g. {', '.join(known[:3])}"
        raise BackboneLoadError(f"unknown open_clip architecture {spec.arch!r}; {hint} "
                                "(all: python -c 'import open_clip; print(open_clip.list_models())')")
    kwargs: dict = {"force_image_size": image_size} if image_size else {}
    if quick_gelu is None and spec.weights_is_path and "openai" in Path(spec.weights or "").name.lower():
        warnings.warn(
            "OpenAI CLIP weights were trained with QuickGELU; using the -quickgelu activation for "
            f"{spec.weights}. Pass the '-quickgelu' architecture explicitly to silence this.",
            stacklevel=3,
        )
        quick_gelu = True
    if quick_gelu:
        kwargs["force_quick_gelu"] = True
    if spec.weights is None:  # random init: seed it, so every process builds the same weights (same sha)
        with torch.random.fork_rng(devices=[]):  # the model is built on CPU: seed (and restore) only that RNG
            torch.default_generator.manual_seed(0)
            return open_clip.create_model(arch, pretrained=None, **kwargs)
    if spec.weights_is_path:
        return _load_checkpoint(arch, spec, kwargs)
    if not open_clip.get_pretrained_cfg(arch, spec.weights):
        tags = open_clip.list_pretrained_tags_by_model(arch)
        raise BackboneLoadError(
            f"open_clip has no pretrained tag {spec.weights!r} for {spec.arch}; known tags: "
            f"{', '.join(tags) or 'none'}; or pass a local checkpoint path ('open_clip:{spec.arch}:/path/to/file')")
    offline = offline_requested() or not hub_reachable()
    try:
        with hub_offline() if offline else contextlib.nullcontext():
            return open_clip.create_model(arch, pretrained=spec.weights, **kwargs)
    except Exception as exc:  # network, missing tag, bad download: all end in the same advice
        why = (f"the model hub ({hub_endpoint()}) cannot be reached and the weights are not in the local cache"
               if offline else f"{type(exc).__name__}: {exc}")
        raise BackboneLoadError(
            f"could not get CLIP weights {spec.weights!r} for {spec.arch}: {why}. "
            f"Offline: download the checkpoint elsewhere and pass 'open_clip:{spec.arch}:/path/to/"
            f"open_clip_model.safetensors', or use '{EFFICIENTNET_LITE0}' (bundled, memory branch only)."
        ) from exc


def _load_checkpoint(arch: str, spec: BackboneSpec, kwargs: dict) -> nn.Module:
    """A local checkpoint file: a missing file, a folder and a corrupt file each get their own advice."""
    path = Path(spec.weights or "")
    if path.is_dir():
        inside = sorted(p.name for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES)[:5]
        hint = f" (it holds {', '.join(inside)})" if inside else ""
        raise BackboneLoadError(
            f"CLIP checkpoint {str(path)!r} is a directory; pass the checkpoint file inside it{hint}, e.g. "
            f"'open_clip:{spec.arch}:{path / 'open_clip_model.safetensors'}'")
    if not path.is_file():
        raise BackboneLoadError(
            f"CLIP checkpoint file {str(path)!r} does not exist. Pass the path of a local .safetensors/.pt "
            f"open_clip checkpoint, or use '{EFFICIENTNET_LITE0}' (bundled, offline, memory branch only).")
    try:
        return open_clip.create_model(arch, pretrained=str(path), **kwargs)
    except Exception as exc:  # truncated copy, wrong format, another architecture's weights
        first = " ".join(str(exc).split())[:200]
        raise BackboneLoadError(
            f"cannot read CLIP checkpoint {str(path)!r} ({path.stat().st_size} bytes) as {spec.arch} weights: "
            f"{type(exc).__name__}: {first}. The file is corrupt or truncated, or holds another architecture: "
            "copy it again and check its sha256, or name the architecture it was trained as") from exc


class ClipBackbone(Backbone):
    """open_clip model, frozen; features are read from its own modules block by block."""

    supports_text = True

    def __init__(
        self,
        model: nn.Module,
        *,
        spec: str,
        device: str | torch.device = "cpu",
        precision: str = "auto",
        layers: Sequence[int] | None = None,
        dpam_layers: Sequence[int] | None = None,
        weights_sha256: str | None = None,
    ):
        visual: VisionTransformer = model.visual
        if getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", "tok") != "tok":
            raise BackboneLoadError("only open_clip ViTs with CLS-token pooling are supported")
        if not getattr(visual.transformer, "batch_first", True):
            raise BackboneLoadError("open_clip transformers must be batch_first (open_clip >= 3 default)")
        if getattr(visual, "final_ln_after_pool", False) or visual.proj is None:
            raise BackboneLoadError("only open_clip ViTs with ln_post + proj heads are supported")
        self.spec = spec
        self.weights_sha256 = weights_sha256 or state_dict_sha256(model)
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.dtype = PRECISIONS[self.precision]
        split_attention(visual.transformer.resblocks)
        model.eval().requires_grad_(False)
        self.model = model.to(self.device)
        if self.dtype != torch.float32:
            self.model.to(self.dtype)
        size = visual.image_size
        self.image_size = int(size[0] if isinstance(size, tuple | list) else size)
        cfg = getattr(visual, "preprocess_cfg", {}) or {}
        self.mean = tuple(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN))
        self.std = tuple(cfg.get("std", open_clip.OPENAI_DATASET_STD))
        self.depth = len(visual.transformer.resblocks)
        self.layers = tuple(layers) if layers else even_layers(self.depth)
        default_dpam = tuple(range(self.depth // 2 + 1, self.depth + 1))
        self.dpam_layers = tuple(dpam_layers) if dpam_layers else default_dpam
        for name, values in (("layers", self.layers), ("dpam_layers", self.dpam_layers)):
            if not values or min(values) < 1 or max(values) > self.depth:
                raise ValueError(f"{name} must be 1-based block indices in 1..{self.depth}, got {values}")
        grid = visual.grid_size
        self.grid = (int(grid[0]), int(grid[1]))
        patch = visual.patch_size
        self.frame_multiple = int(patch[0] if isinstance(patch, tuple | list) else patch)
        self._positions: dict[tuple, torch.Tensor] = {}

    @property
    def visual(self) -> VisionTransformer:
        return self.model.visual

    def _to_joint_space(self, tokens: torch.Tensor) -> torch.Tensor:
        """ln_post + proj: the head CLIP uses for CLS, applied to patch tokens (AnomalyCLIP / APRIL-GAN)."""
        return F.normalize((self.visual.ln_post(tokens) @ self.visual.proj).float(), dim=-1)

    def positions(self, grid: tuple[int, int]) -> torch.Tensor:
        """Position embeddings for a (rows, cols) patch grid: the trained square grid, bicubically
        interpolated when a geometry feeds a non-square frame (CLS position unchanged)."""
        pos = self.visual.positional_embedding
        if grid == self.grid:
            return pos
        key = (grid, pos.dtype, pos.device)
        if key not in self._positions:
            rows, cols = self.grid
            table = pos[1:].float().reshape(rows, cols, -1).permute(2, 0, 1)[None]
            table = F.interpolate(table, size=grid, mode="bicubic", align_corners=False)[0]
            self._positions[key] = torch.cat([pos[:1].float(), table.flatten(1).t()]).to(pos.dtype)
        return self._positions[key]

    def _embeds(self, pixels: torch.Tensor) -> torch.Tensor:
        """open_clip's ``_embeds`` with position embeddings for any grid (non-square frames, tiles)."""
        visual = self.visual
        height, width = pixels.shape[-2:]
        if height % self.frame_multiple or width % self.frame_multiple:
            raise ValueError(f"input {height}x{width} is not a multiple of the patch size {self.frame_multiple}")
        x = visual.conv1(pixels)
        grid = (x.shape[-2], x.shape[-1])
        x = x.flatten(2).transpose(1, 2)
        cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.positions(grid).to(x.dtype)
        return visual.ln_pre(visual.patch_dropout(x))

    def extract(self, pixels: torch.Tensor, *, dpam: bool = False) -> Features:
        """CLS from the original path; patch tokens from the V-V path on DPAM layers when ``dpam``."""
        visual = self.visual
        dpam_set = set(self.dpam_layers) if dpam else set()
        with self.autocast():
            x = self._embeds(pixels.to(self.dtype))
            grid = (pixels.shape[-2] // self.frame_multiple, pixels.shape[-1] // self.frame_multiple)
            vv: torch.Tensor | None = None
            taken: list[torch.Tensor] = []
            for index, block in enumerate(visual.transformer.resblocks, start=1):
                if index in dpam_set:
                    if vv is None:
                        vv = x
                    vv = vv + block.ls_1(block.attn.value_value(block.ln_1(x)))
                x = block(x)
                if index in self.layers:
                    source = vv if vv is not None and index in dpam_set else x  # vv is set on every DPAM layer
                    taken.append(self._to_joint_space(source[:, 1:]))
            cls = self._to_joint_space(x[:, 0])
        return Features(cls=cls, patches=taken, grid=grid)
