"""The ``clipshot`` console script: one entry point, a subcommand per job (serve, train, eval, info)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence


def _add_info_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "info", help="load a backbone and print what it supports (checks an offline CLIP checkpoint path)",
        description="Load a backbone spec and print its resolution, layers, weights sha256 and supported branches.",
    )
    parser.add_argument("--backbone", default="imagenet:efficientnet-lite0",
                        help="backbone spec, e.g. open_clip:ViT-B-16-plus-240:/path/to/weights.safetensors")
    parser.add_argument("--device", default="cpu")
    parser.set_defaults(func=_info)


def _info(args: argparse.Namespace) -> int:
    from clipshot.backbone import load_backbone

    backbone = load_backbone(args.backbone, device=args.device)
    print(f"backbone:      {backbone.spec}")
    print(f"weights sha256 {backbone.weights_sha256}")
    print(f"image size:    {backbone.image_size}")
    print(f"layers:        {list(backbone.layers)}")
    branches = "text + memory (zero-shot, LoRA fine-tuning)" if backbone.supports_text else "memory only"
    print(f"branches:      {branches}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from app.cli import add_serve_parser
    from training.cli import add_train_parser

    from clipshot.evaluation.command import add_eval_parser

    parser = argparse.ArgumentParser(
        prog="clipshot",
        description="Few-shot / zero-shot industrial anomaly detection on a frozen CLIP with per-product adapters.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_serve_parser(subparsers)
    add_train_parser(subparsers)
    add_eval_parser(subparsers)
    _add_info_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, dispatch, and turn expected failures (bad input, missing weights) into one-line errors."""
    from clipshot.backbone import BackboneLoadError, BackboneSpecError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    try:
        return int(args.func(args) or 0)
    except (BackboneLoadError, BackboneSpecError, ValueError, FileNotFoundError) as exc:
        print(f"clipshot {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
