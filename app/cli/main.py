"""``clipshot``: one console script, a subcommand per job, each imported only when it runs.

Why lazy: the commands need torch, open_clip, peft and FastAPI, which take seconds to import; ``--help``,
``--version`` and a mistyped command must answer at once. Only the chosen command's module is imported to
build its parser (the others are listed from ``COMMANDS``), and heavy imports wait for its handler.
Expected failures (bad input, missing weights, no CUDA) end in one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib import import_module

from app.cli.common import CliError, check_device, resolve_env_defaults

# command -> (module with ``register(subparsers, name, help)``, one-line help). A new command is one row here.
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("app.cli.serve", "run the anomaly-detection HTTP service"),
    "serve-ray": ("app.cli.serve_ray", "run the service on Ray Serve: router + detector replicas (extra: ray)"),
    "train": ("app.cli.train", "train an adapter (few-shot product or generic zero-shot)"),
    "eval": ("app.cli.eval", "run the MVTec AD few-/zero-shot protocol on an MVTec-layout dataset"),
    "info": ("app.cli.info", "load a backbone and print what it supports (checks an offline CLIP checkpoint path)"),
    "predict": ("app.cli.predict", "score images or folders against a running service (--url) or a local store"),
    "export": ("app.cli.export", "export a category's feature extractor to ONNX or OpenVINO (extra: runtimes)"),
    "watch": ("app.cli.watch", "hot folder: inspect images as cameras write them, move them to done/ or failed/"),
    "samples": ("app.cli.samples", "write photos of a made-up product (goods, defects, masks) to try the service on"),
}
DESCRIPTION = "Few-shot / zero-shot industrial anomaly detection on a frozen CLIP with per-product adapters."
EXIT_USAGE = 2  # bad input, bad configuration, missing weights: what the user must change
EXIT_INTERRUPTED = 130


def version() -> str:
    """The installed distribution's version (no package import: ``--version`` must stay instant)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("clipshot")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0+unknown"


def build_parser(full: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The top-level parser; commands named in ``full`` get their real parser, the rest a listing stub."""
    parser = argparse.ArgumentParser(prog="clipshot", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"clipshot {version()}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log at DEBUG level (default: warnings and errors; `serve` has --log-level)")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        if name in full:
            import_module(module).register(subparsers, name, help_text)
        else:
            subparsers.add_parser(name, help=help_text, add_help=False)
    return parser


def _chosen(argv: Sequence[str]) -> list[str]:
    """The command the user asked for: the first word that is not an option (global options are flags)."""
    first = next((arg for arg in argv if not arg.startswith("-")), None)
    return [first] if first in COMMANDS else []


def _suggest_command(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    """A mistyped command gets argparse's usage error plus the nearest real command (exit code 2)."""
    import difflib

    first = next((arg for arg in argv if not arg.startswith("-")), None)
    if first is not None and first not in COMMANDS:
        close = difflib.get_close_matches(first, COMMANDS, n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}?" if close else f"commands: {', '.join(COMMANDS)}"
        parser.error(f"unknown command {first!r}; {hint}")


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, dispatch, and turn expected failures into one line on stderr; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(full=_chosen(argv))
    _suggest_command(parser, argv)
    args = parser.parse_args(argv)
    try:
        resolve_env_defaults(args)
        if getattr(args, "device", None) is not None:
            check_device(args.device)
        if args.command != "serve":  # serve configures logging from its settings (format, level, request ids)
            from app.core.logs import configure_logging, log_format_from_env

            configure_logging("debug" if args.verbose else "warning", log_format_from_env(), request_ids=False)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as exc:
        if not isinstance(exc, _expected_errors()):
            raise
        print(f"clipshot {args.command}: error: {one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (messages from libraries sometimes span several)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def _expected_errors() -> tuple[type[BaseException], ...]:
    """Failures that are the user's to fix. Backbone errors count only if their module was imported at all."""
    errors: list[type[BaseException]] = [CliError, ValueError, FileNotFoundError, IsADirectoryError,
                                         NotADirectoryError, PermissionError]
    backbone = sys.modules.get("clipshot.backbone")
    if backbone is not None:
        errors.append(backbone.BackboneLoadError)
    return tuple(errors)


if __name__ == "__main__":
    sys.exit(main())
