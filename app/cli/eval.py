"""``clipshot eval``: registration of the command whose parser and handler are in ``app.cli.eval_command``.

Registering it imports torch (the harness imports the backbone package), so this module is only imported
when ``eval`` is the chosen command. Here its ``--backbone`` and ``--device`` learn to read
``CLIPSHOT_BACKBONE`` / ``CLIPSHOT_DEVICE`` like every other command.
"""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any, name: str, help_text: str) -> argparse.ArgumentParser:
    """Register ``eval`` (the harness names itself and writes its own help line; ``name`` must be "eval")."""
    from app.cli.common import honour_env
    from app.cli.eval_command import add_eval_parser

    add_eval_parser(subparsers)
    parser = subparsers.choices[name]
    for dest in ("backbone", "device"):
        honour_env(parser, dest)
    return parser
