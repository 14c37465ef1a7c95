"""A real ``clipshot serve`` process on a free loopback port, for tests of what only a real server does."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

STARTUP_TIMEOUT_S = 120
ADMIN = "live-admin-key"
CLIENT = "live-client-key"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class LiveServer:
    proc: subprocess.Popen
    port: int
    log_path: Path

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def connect(self, timeout: float = 10.0) -> socket.socket:
        """A raw TCP connection, for clients no HTTP library would imitate (slow, huge, half-sent)."""
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def read_response(sock: socket.socket, timeout: float) -> bytes:
    """Everything the server sends until it closes the connection (or ``timeout`` passes)."""
    sock.settimeout(timeout)
    data = b""
    with contextlib.suppress(TimeoutError, ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
    return data


def status_of(raw: bytes) -> int | None:
    """The status code of a raw HTTP/1.1 response, or None if nothing arrived."""
    if not raw.startswith(b"HTTP/1.1 "):
        return None
    return int(raw[9:12])


@contextlib.contextmanager
def live_server(tmp_path: Path, *, command: str = "serve", startup_timeout: float = STARTUP_TIMEOUT_S,
                stop_timeout: float = 30, **env: str) -> Iterator[LiveServer]:
    """Start ``clipshot serve`` (or ``serve-ray``: tiny CLIP on CPU, admin + client keys) and stop it with
    SIGINT afterwards; its process group is killed if it does not stop (Ray's helpers included)."""
    exe = shutil.which("clipshot")
    assert exe, "the clipshot console script is not installed (pip install -e .)"
    port = free_port()
    full_env = {**os.environ, "CLIPSHOT_BACKBONE": "test:tiny-clip", "CLIPSHOT_DEVICE": "cpu",
                "CLIPSHOT_STORE": str(tmp_path / "store"), "CLIPSHOT_ADMIN_KEYS": ADMIN,
                "CLIPSHOT_CLIENT_KEYS": CLIENT, "OMP_NUM_THREADS": "1", **env}
    log_path = tmp_path / f"serve-{port}.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen([exe, command, "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
                                env=full_env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    server = LiveServer(proc, port, log_path)
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            assert proc.poll() is None, f"server exited early:\n{server.log()}"
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{server.base}/healthz", timeout=1).status_code == 200:
                    break
            assert time.monotonic() < deadline, f"server did not come up in time:\n{server.log()}"
            time.sleep(0.25)
        yield server
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=stop_timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
