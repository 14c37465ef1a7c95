"""``clipshot info``: load a backbone and print what it supports (the offline check of a CLIP or ViT checkpoint)."""

from __future__ import annotations

import argparse
from typing import Any

from app.cli.common import EFFICIENTNET_LITE0, env_option


def register(subparsers: Any, name: str, help_text: str) -> argparse.ArgumentParser:
    """Register ``info`` on the console script's subparsers."""
    parser = subparsers.add_parser(
        name, help=help_text,
        description="Load a backbone spec and print its resolution, layers, weights sha256, supported branches and "
        "the precision memory scoring runs in on this machine.",
    )
    env_option(parser, "--backbone", EFFICIENTNET_LITE0,
               "backbone spec, e.g. open_clip:ViT-B-16-plus-240:/path/to/weights.safetensors or "
               "timm:vit_small_patch14_dinov2:/path/to/model.safetensors")
    env_option(parser, "--device", "cpu", "auto, cpu, cuda, cuda:N")
    parser.set_defaults(func=info)
    return parser


def info(args: argparse.Namespace) -> int:
    """Print the backbone's facts; loading it is the check (weights readable, architecture known)."""
    from clipshot.backbone import load_backbone

    backbone = load_backbone(args.backbone, device=args.device)
    print(f"backbone:      {backbone.spec}")
    print(f"weights sha256 {backbone.weights_sha256}")
    print(f"image size:    {backbone.image_size}")
    print(f"layers:        {list(backbone.layers)}")
    print(f"frame multiple {backbone.frame_multiple}")
    weights_path = getattr(backbone, "weights_path", None)
    if weights_path:  # compare with `sha256sum` of the file and the sha256 published with it
        print(f"weights file:  {weights_path}")
    branches = "text + memory (zero-shot, LoRA fine-tuning)" if backbone.supports_text else "memory only"
    print(f"branches:      {branches}")
    from clipshot.memory_branch import memory_precision, native_bf16

    precision = memory_precision(backbone.device, backbone.precision)
    native = "native bf16" if native_bf16(backbone.device) else "no native bf16"
    print(f"memory scoring {precision} with memory_precision=auto ({backbone.device.type}, {native})")
    return 0
