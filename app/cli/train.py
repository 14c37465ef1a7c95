"""``clipshot train fewshot|generic``: parsers only; the trainers (``training.cli``) load when a command runs."""

from __future__ import annotations

import argparse
from typing import Any

from app.cli.common import DEFAULT_BACKBONE, PRECISION_CHOICES, env_option, lazy


def _common(parser: argparse.ArgumentParser) -> None:
    env_option(parser, "--backbone", DEFAULT_BACKBONE, "backbone spec")
    env_option(parser, "--store", "store", "adapter store directory")
    parser.add_argument("--steps", type=int, default=None, help="optimisation steps (default: the config's)")
    parser.add_argument("--seconds", type=float, default=None, help="time budget in seconds of training")
    parser.add_argument("--seed", type=int, default=0)
    env_option(parser, "--device", "auto", "auto, cpu, cuda, cuda:N")
    env_option(parser, "--precision", "auto", "auto = bf16 on GPUs that have it, fp32 on CPU",
               choices=PRECISION_CHOICES)


def register(subparsers: Any, name: str, help_text: str) -> argparse.ArgumentParser:
    """Register ``train fewshot`` and ``train generic`` on the console script's subparsers."""
    train = subparsers.add_parser(name, help=help_text)
    sub = train.add_subparsers(dest="train_command", metavar="{fewshot,generic}")
    sub.required = True
    few = sub.add_parser("fewshot", help="fine-tune LoRA + prompts on 1-16 normal photos of one product")
    few.add_argument("--category", required=True, help="product name (a-z, 0-9, '.', '_', '-')")
    few.add_argument("--shots", nargs="+", required=True, metavar="DIR|FILE", help="image files and/or folders")
    few.add_argument("--object", dest="object_name", default=None, help="what the product is, e.g. 'screw'")
    _common(few)
    few.set_defaults(func=lazy("training.cli", "run_fewshot"))
    gen = sub.add_parser("generic", help="train the object-agnostic zero-shot adapter on an MVTec-layout dataset")
    gen.add_argument("--data", required=True, help="dataset root (<root>/<category>/test, ground_truth)")
    gen.add_argument("--categories", default=None, help="comma-separated subset (default: all)")
    _common(gen)
    gen.set_defaults(func=lazy("training.cli", "run_generic"))
    return train
