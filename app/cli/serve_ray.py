"""``clipshot serve-ray``: run clipshot as a Ray Serve application (router + detector replicas).

Like ``clipshot serve``, everything is checked before a model loads and every expected failure is one line
with a fix; unlike it, the HTTP server is Ray Serve's proxy (one per node) and each detector replica is a
whole clipshot service. The command stays in the foreground; Ctrl-C or SIGTERM removes the application
(and stops the private Ray instance it started, if it started one).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import Any

from app.cli.serve import EXIT_CONFIG, EXIT_STARTUP, LOG_LEVELS, fail

FLAGS = {"host": "--host", "port": "--port", "ray_address": "--address"}


def register(subparsers: Any, name: str, help_text: str) -> argparse.ArgumentParser:
    """Register ``serve-ray`` on the console script's subparsers."""
    parser = subparsers.add_parser(
        name, help=help_text,
        description="Run clipshot on Ray Serve (needs the ray extra: pip install -e '.[ray]'). A CPU router "
        "resolves each prediction to category@version from the shared store and Ray Serve routes it to a "
        "detector replica that already holds that adapter. Replicas, GPUs and autoscaling come from the "
        "CLIPSHOT_RAY_* settings (docs/reference/settings.md); docs/deploy.md shows one box and KubeRay.",
    )
    parser.add_argument("--host", default=None, help="interface of Ray Serve's HTTP proxy (default: CLIPSHOT_HOST "
                        "or 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="HTTP port (default: CLIPSHOT_PORT or 8000)")
    parser.add_argument("--address", default=None, help="Ray cluster (default: CLIPSHOT_RAY_ADDRESS; empty starts "
                        "a private Ray instance on this machine, `auto` joins this node's cluster)")
    parser.add_argument("--log-level", default="info", choices=LOG_LEVELS, help="lowest level logged (default: info)")
    parser.set_defaults(func=serve_ray)
    return parser


def serve_ray(ns: argparse.Namespace) -> int:
    """Validate, deploy, wait for a stop signal, tear down; returns the exit code."""
    from pydantic import ValidationError

    from app.core.config import InsecureConfigurationError, Settings
    from app.core.env import settings_error_line, unknown_env_warnings
    from app.core.logs import configure_logging

    configure_logging("debug" if getattr(ns, "verbose", False) else ns.log_level, "text", request_ids=False)
    overrides = {key: value for key, flag in FLAGS.items()
                 if (value := getattr(ns, flag.lstrip("-"), None)) is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        return _fail(settings_error_line(exc, cli_flags=FLAGS), EXIT_CONFIG)
    for warning in unknown_env_warnings():
        print(f"clipshot serve-ray: warning: {warning}", file=sys.stderr)
    from app.distributed.launch import RayConfigError, deploy

    try:
        deploy(settings)
    except InsecureConfigurationError as exc:
        return _fail(str(exc), EXIT_CONFIG)
    except RayConfigError as exc:
        return _fail(str(exc), EXIT_STARTUP)
    print(f"clipshot serve-ray: serving on http://{settings.host}:{settings.port} "
          f"({settings.ray_min_replicas}-{settings.ray_max_replicas} detector replicas)", file=sys.stderr)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    _teardown(private=not settings.ray_address)
    return 0


def _teardown(*, private: bool) -> None:
    """Remove our application; on a private Ray instance stop Ray too."""
    import ray
    from ray import serve

    from app.distributed.launch import APP_NAME

    serve.delete(APP_NAME)
    if private:
        serve.shutdown()
        ray.shutdown()


def _fail(message: str, code: int) -> int:
    return fail(message, code, command="serve-ray")
