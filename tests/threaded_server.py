"""A real uvicorn server on a loopback port, in a thread of the test process so it can share the session's
tiny backbone: for tests that need a real socket (browser, Python client, ``clipshot predict --url``). Same
app factory as ``clipshot serve``; tests of the serve process itself start the console script instead."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn

from app.core.config import Settings
from app.main import create_app

STARTUP_TIMEOUT_S = 60


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def threaded_server(settings: Settings, backbone=None, app=None) -> Iterator[str]:
    """Serve ``create_app(settings)`` (or ``app``, to reach its state) on 127.0.0.1 until the block ends; yields
    the base URL."""
    port = free_port()
    config = uvicorn.Config(app or create_app(settings, backbone=backbone), host="127.0.0.1", port=port,
                            log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="threaded-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not server.started:
        assert thread.is_alive(), "the server thread died during startup"
        assert time.monotonic() < deadline, "the server did not start in time"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
