"""Time to refusal of hostile clients against a real ``clipshot serve`` (issue 13 items 2-4), and how slow
``/healthz`` gets on other connections meanwhile.

    python benchmarks/hostile_clients.py [--max-connections 200] [--half-sent 500]

Starts the server with the tiny test model and the default limits (only ``CLIPSHOT_MAX_CONNECTIONS`` is set, so
the cap can be reached without raising the client's file limit) and prints one row per attack.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Probe:
    """/healthz every 50 ms on its own connection; keeps the slowest answer."""

    def __init__(self, base: str) -> None:
        self.base, self.worst, self.stop = base, 0.0, threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        with httpx.Client(base_url=self.base, timeout=60) as client:
            while not self.stop.is_set():
                start = time.monotonic()
                client.get("/healthz")
                self.worst = max(self.worst, time.monotonic() - start)
                time.sleep(0.05)

    def __enter__(self) -> Probe:
        self.thread.start()
        time.sleep(0.2)  # the probe's connection is open and answering before the attack starts
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=120)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def answer(sock: socket.socket) -> tuple[str, float]:
    """(status line or 'closed', seconds) until the server answers or closes."""
    start, data = time.monotonic(), b""
    with contextlib.suppress(OSError):
        while chunk := sock.recv(65536):
            data += chunk
    line = data.split(b"\r\n", 1)[0].decode(errors="replace") if data else "closed"
    return line, time.monotonic() - start


def trickle(sock: socket.socket, byte: bytes, every: float, limit: float) -> float:
    """Send one byte every ``every`` s until the server drops us; seconds it took (or ``limit``)."""
    start = time.monotonic()
    with contextlib.suppress(OSError):
        while time.monotonic() - start < limit:
            sock.sendall(byte)
            time.sleep(every)
    return time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-connections", type=int, default=200)
    parser.add_argument("--half-sent", type=int, default=500)
    args = parser.parse_args()
    port, store = free_port(), tempfile.mkdtemp()
    env = {**os.environ, "CLIPSHOT_BACKBONE": "test:tiny-clip", "CLIPSHOT_DEVICE": "cpu", "CLIPSHOT_STORE": store,
           "CLIPSHOT_ADMIN_KEYS": "bench-admin", "CLIPSHOT_MAX_CONNECTIONS": str(args.max_connections)}
    exe = shutil.which("clipshot") or "clipshot"
    proc = subprocess.Popen([exe, "serve", "--port", str(port), "--log-level", "error"], env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            time.sleep(0.25)
        rows = []

        sock = connect(port)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 65536)
        rows.append(("64 KiB header, unterminated", *answer(sock), "-"))

        with Probe(base) as probe:
            sock, start = connect(port), time.monotonic()
            with contextlib.suppress(OSError):
                sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: ")
                for _ in range(128):
                    sock.sendall(b"a" * (1 << 20))
            rows.append(("128 MiB header", "cut off", time.monotonic() - start, f"{probe.worst * 1000:.0f} ms"))

        with Probe(base) as probe:
            sock = connect(port)
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            rows.append(("header, 1 byte / 2 s", "dropped", trickle(sock, b"X", 2.0, 120),
                         f"{probe.worst * 1000:.0f} ms"))

        with Probe(base) as probe:
            sock = connect(port)
            sock.sendall(b"POST /v1/categories/w/shots HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer bench-admin\r\n"
                         b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 100000\r\n\r\n")
            rows.append(("body, 1 byte / 2 s", "dropped", trickle(sock, b"-", 2.0, 120),
                         f"{probe.worst * 1000:.0f} ms"))

        sock = connect(port)
        sock.sendall(b"POST /v1/categories/w/shots HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
                     b"boundary=b\r\nContent-Length: 104857600\r\n\r\n--b\r\n" + b"z" * 1000)
        rows.append(("anonymous 100 MiB upload", *answer(sock), "-"))

        held = []
        with Probe(base) as probe:
            start = time.monotonic()
            for _ in range(args.half_sent):
                with contextlib.suppress(OSError):
                    s = connect(port)
                    s.sendall(b"GET /healthz HTTP/1.1\r\n")
                    held.append(s)
            refused = [answer(s)[0] for s in held]
            rows.append((f"{args.half_sent} half-sent connections", f"{refused.count(refused[-1])} x {refused[-1]}",
                         time.monotonic() - start, f"{probe.worst * 1000:.0f} ms"))
            statuses = sorted(set(refused))
            rows.append(("  of which answered", ", ".join(f"{refused.count(s)} x {s}" for s in statuses), 0.0, "-"))

        print("| attack | answer | seconds | worst /healthz meanwhile |\n|---|---|---:|---:|")
        for name, status, seconds, worst in rows:
            print(f"| {name} | {status} | {seconds:.3f} | {worst} |")
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
        shutil.rmtree(store, ignore_errors=True)


if __name__ == "__main__":
    main()
