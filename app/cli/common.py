"""Helpers shared by the ``clipshot`` subcommands; stdlib only, so building parsers stays instant."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from importlib import import_module
from pathlib import Path

ENV_PREFIX = "CLIPSHOT_"  # the service's settings prefix: one variable configures the service and the CLI
DEFAULT_BACKBONE = "open_clip:ViT-B-16-plus-240:laion400m_e32"  # = clipshot.backbone.DEFAULT_BACKBONE (tested)
EFFICIENTNET_LITE0 = "imagenet:efficientnet-lite0"
PRECISION_CHOICES = ("auto", "fp32", "fp16", "bf16")  # = clipshot.backbone.PRECISION_CHOICES (tested)


class CliError(ValueError):
    """Bad command-line input; printed as one line, exit code 2."""


KEY_ENV = "CLIPSHOT_KEY"  # listed in app.core.env.EXTRA_KNOWN: not a typo of a setting

def lazy(module: str, function: str) -> Callable[[argparse.Namespace], int]:
    """A handler that imports ``module`` only when the command runs (parsers must not pay for torch)."""

    def handler(args: argparse.Namespace) -> int:
        return getattr(import_module(module), function)(args)

    handler.__qualname__ = f"{module}.{function}"
    return handler


def env_option(parser: argparse.ArgumentParser, flag: str, fallback: str, help_text: str, **kwargs) -> None:
    """``--flag`` whose default is ``$CLIPSHOT_<FLAG>``, else ``fallback``, resolved when the command runs.

    Resolving late keeps ``--help`` (and the generated CLI reference) independent of the environment.
    """
    dest = flag.lstrip("-").replace("-", "_")
    env = f"{ENV_PREFIX}{dest.upper()}"
    parser.add_argument(flag, default=None, help=f"{help_text} (default: ${env}, else {fallback})", **kwargs)
    _remember(parser, dest, env, fallback)


def honour_env(parser: argparse.ArgumentParser, dest: str) -> None:
    """Make an existing option's default come from ``$CLIPSHOT_<DEST>`` first (for parsers defined elsewhere)."""
    action = next(a for a in parser._actions if a.dest == dest)
    env = f"{ENV_PREFIX}{dest.upper()}"
    fallback, action.default = action.default, None
    action.help = f"{action.help or dest} (default: ${env}, else {fallback})"
    _remember(parser, dest, env, fallback)


def _remember(parser: argparse.ArgumentParser, dest: str, env: str, fallback: str) -> None:
    known = dict(parser.get_default("_env_defaults") or {})
    known[dest] = (env, fallback)
    parser.set_defaults(_env_defaults=known)


def resolve_env_defaults(args: argparse.Namespace) -> None:
    """Fill options left unset on the command line from the environment, else their fallback."""
    for dest, (env, fallback) in (getattr(args, "_env_defaults", None) or {}).items():
        if getattr(args, dest, None) is None:
            setattr(args, dest, os.environ.get(env) or fallback)


def check_device(device: str) -> None:
    """Refuse a CUDA device on a machine without one, in one line, before any model is built."""
    value = str(device).strip().lower()
    if not value.startswith("cuda"):
        return
    import torch  # only for CUDA requests: the answer needs the driver

    if not torch.cuda.is_available():
        build = f"torch {torch.__version__}" + ("" if torch.version.cuda else ", a CPU-only build")
        raise CliError(f"--device {device}: CUDA is not available here ({build}, no GPU visible); "
                       "use --device cpu or --device auto")
    index = value.partition(":")[2]
    if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
        raise CliError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) exist "
                       f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})")


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    """Where images are scored, shared by ``predict`` and ``watch``: a running service (``--url``, ``--key``) or a
    local store scored in-process (``--store``, ``--backbone``, ``--device``)."""
    remote = parser.add_argument_group("running service")
    remote.add_argument("--url", help="service URL (default http://127.0.0.1:8000 unless --store is given)")
    remote.add_argument("--key", default=os.environ.get(KEY_ENV),
                        help=f"API key sent as Authorization: Bearer (default: ${KEY_ENV})")
    local = parser.add_argument_group("local store (no server)")
    local.add_argument("--store", type=Path, help="adapter store directory to score with in-process")
    local.add_argument("--backbone", help="backbone spec for --store (default: CLIPSHOT_BACKBONE or the settings')")
    local.add_argument("--device", help="torch device for --store (default: CLIPSHOT_DEVICE or auto)")
