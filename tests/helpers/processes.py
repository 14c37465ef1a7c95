"""Shared by the test modules (first written for tests/test_app_serve_subprocess.py)."""

from __future__ import annotations

import socket
import sys
import tomllib

from tests.conftest import REPO

STARTUP_TIMEOUT_S = 90


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_command() -> list[str]:
    """What the ``clipshot`` console script runs, read from pyproject's entry point (the installed wrapper may
    point at another checkout; this runs this one's, exactly as the wrapper would)."""
    entry = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]["clipshot"]
    module, function = entry.split(":")
    return [sys.executable, "-c", f"import sys; from {module} import {function}; sys.exit({function}())", "serve"]
