"""Tiny random DINOv2-style ViT weights written to a file, as a user's downloaded checkpoint would be
(shared by tests/test_vit_backbone.py and tests/test_runtime_service.py). Random weights: structure only."""

from __future__ import annotations

from pathlib import Path

import torch

TINY_VIT = "clipshot-tiny-vit"


def tiny_vit_weights(path: Path, *, seed: int = 1, **overrides) -> Path:
    """Save a freshly initialised ``clipshot-tiny-vit`` (timm built straight from its shipped config, ``overrides``
    changing its shape) to ``path`` (.safetensors, or a torch pickle for any other suffix)."""
    import timm
    from safetensors.torch import save_file

    from clipshot.backbone.vit import vit_config

    config = vit_config(TINY_VIT)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = timm.create_model(config.timm_model, pretrained=False, **{**config.model_args, **overrides})
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


def tiny_vit_spec(path: Path) -> str:
    return f"timm:{TINY_VIT}:{path}"
