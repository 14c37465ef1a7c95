"""``clipshot serve``: run the HTTP service under uvicorn.

The backbone is loaded *before* uvicorn starts, so a missing checkpoint or an offline machine ends
in one readable message and a non-zero exit code instead of a server that logs a traceback wall
and exits. Every option also comes from ``CLIPSHOT_*`` environment variables or ``.env``; command-line
flags win over both.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from typing import Any

from pydantic import ValidationError

from app.api.request_id import RequestIdLogFilter
from app.core.config import InsecureConfigurationError, Settings

EXIT_CONFIG = 2  # bad settings or no keys: fix the configuration
EXIT_STARTUP = 1  # the model or the server could not start


def add_serve_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``serve`` on an argparse subparsers object (the ``clipshot`` console script uses this)."""
    parser = subparsers.add_parser(
        "serve",
        help="run the anomaly-detection HTTP service",
        description="Serve the clipshot API (docs at /docs). Settings come from CLIPSHOT_* environment "
        "variables or a .env file; --host/--port override them.",
    )
    parser.add_argument("--host", default=None, help="interface to bind (default: CLIPSHOT_HOST or 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="TCP port (default: CLIPSHOT_PORT or 8000)")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                        help="server log level (default: info)")
    parser.set_defaults(func=serve)
    return parser


def serve(ns: argparse.Namespace) -> int:
    """Validate settings, load the backbone, then hand the app to uvicorn; returns the exit code."""
    logging.basicConfig(level=ns.log_level.upper(), format="%(levelname)s %(name)s [%(request_id)s]: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(RequestIdLogFilter())
    overrides = {key: value for key in ("host", "port") if (value := getattr(ns, key, None)) is not None}
    try:
        settings = Settings(**overrides)
        settings.validate_security()
    except ValidationError as exc:
        return _fail(f"invalid settings:\n{exc}", EXIT_CONFIG)
    except InsecureConfigurationError as exc:
        return _fail(str(exc), EXIT_CONFIG)

    import uvicorn  # heavy imports only once the configuration is known to be sane

    from app.http_guard import guarded_protocol
    from app.main import StartupError, create_app, load_service_backbone

    try:
        backbone = load_service_backbone(settings)
    except StartupError as exc:
        return _fail(str(exc), EXIT_STARTUP)
    app = create_app(settings, backbone=backbone)
    # Our httptools protocol adds the header-size, read-timeout and connection limits uvicorn lacks.
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=ns.log_level,
                            lifespan="on", timeout_graceful_shutdown=30, http=guarded_protocol(settings),
                            timeout_keep_alive=settings.keep_alive_timeout_s)
    server = uvicorn.Server(config)
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises Ctrl-C after its graceful shutdown
        server.run()
    return 0 if server.started else EXIT_STARTUP


def _fail(message: str, code: int) -> int:
    print(f"clipshot serve: {message}", file=sys.stderr)
    return code
