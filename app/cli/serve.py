"""``clipshot serve``: run the HTTP service under uvicorn.

The settings are validated and the backbone is loaded *before* uvicorn starts, so a bad variable, a
missing checkpoint or an offline machine ends in one line naming what to change and a non-zero exit
code, instead of a server that logs a traceback wall. Every option also comes from ``CLIPSHOT_*``
environment variables or ``.env``; command-line flags win over both. Logging is configured here once
(level, text or JSON, request ids) and uvicorn's own loggers are routed through it.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from typing import Any

EXIT_CONFIG = 2  # bad settings or no keys: fix the configuration
EXIT_STARTUP = 1  # the model or the server could not start
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
SHUTDOWN_DRAIN_S = 30  # uvicorn's graceful drain; docker/compose.yaml's stop_grace_period must exceed it (tested)

log = logging.getLogger("clipshot.serve")


def register(subparsers: Any, name: str, help_text: str) -> argparse.ArgumentParser:
    """Register ``serve`` on the console script's subparsers."""
    parser = subparsers.add_parser(
        name, help=help_text,
        description="Serve the clipshot API (docs at /docs). Settings come from CLIPSHOT_* environment "
        "variables or a .env file; --host/--port override them. Logs go to stderr, one line per record "
        "(CLIPSHOT_LOG_FORMAT=json for JSON lines), each naming the request id of the request it belongs to.",
    )
    parser.add_argument("--host", default=None, help="interface to bind (default: CLIPSHOT_HOST or 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="TCP port (default: CLIPSHOT_PORT or 8000)")
    parser.add_argument("--log-level", default="info", choices=LOG_LEVELS,
                        help="lowest level logged, uvicorn's access log included (default: info)")
    parser.set_defaults(func=serve)
    return parser


def serve(ns: argparse.Namespace) -> int:
    """Validate settings, load the backbone, then hand the app to uvicorn; returns the exit code."""
    from pydantic import ValidationError

    from app.core.config import InsecureConfigurationError, Settings
    from app.core.env import settings_error_line, unknown_env_warnings
    from app.core.logs import configure_logging

    level = "debug" if getattr(ns, "verbose", False) else ns.log_level
    configure_logging(level, "text", request_ids=True)  # until the settings name the format
    overrides = {key: value for key in ("host", "port") if (value := getattr(ns, key, None)) is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        return fail(settings_error_line(exc, cli_flags={"host": "--host", "port": "--port"}), EXIT_CONFIG)
    configure_logging(level, settings.log_format, request_ids=True)
    for warning in unknown_env_warnings():
        log.warning(warning)
    try:
        settings.validate_security()  # warns (once) when running without keys
    except InsecureConfigurationError as exc:
        return fail(str(exc), EXIT_CONFIG)

    import uvicorn  # heavy imports only once the configuration is known to be sane

    from app.http_guard import guarded_protocol
    from app.main import (
        StartupError,
        check_line_inputs,
        create_app,
        load_service_backbone,
        open_job_store,
        start_mqtt,
    )

    try:
        if settings.job_db:  # a shared database must be reachable before minutes go into loading a model
            open_job_store(settings).close()
        if settings.mqtt_host and (probe := start_mqtt(settings, send=False)):  # so must the broker and TLS files
            probe.stop()
        check_line_inputs(settings)  # and the OPC UA certificate, key, trusted clients, users, image folders
        backbone = load_service_backbone(settings)
    except StartupError as exc:
        return fail(str(exc), EXIT_STARTUP)
    app = create_app(settings, backbone=backbone)
    # log_config=None: uvicorn keeps its hands off logging, its loggers propagate to our root handler.
    # Our httptools protocol adds the header-size, read-timeout and connection limits uvicorn lacks.
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=level, log_config=None,
                            lifespan="on", timeout_graceful_shutdown=SHUTDOWN_DRAIN_S,
                            http=guarded_protocol(settings), timeout_keep_alive=settings.keep_alive_timeout_s)
    server = uvicorn.Server(config)
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises Ctrl-C after its graceful shutdown
        server.run()
    return 0 if server.started else EXIT_STARTUP


def fail(message: str, code: int, command: str = "serve") -> int:
    """One line on stderr, ``clipshot <command>: <message>`` (whitespace folded); returns ``code``."""
    print(f"clipshot {command}: {' '.join(message.split())}", file=sys.stderr)
    return code
