"""Predict latency on one product while another product registers (not a test: figures for the README/issues).

A real server (``create_app`` under uvicorn on loopback, in this process) serves product A; closed-loop clients
send A's predicts one image at a time. First they run alone (``idle``), then while product B registers
``--shots`` shots (``during``: until B's 201 arrives, repeated ``--registrations`` times with fresh products).
Reported: predict p50/p99/max per phase and the registration time. Only the public HTTP API is used, so the same
script measures any commit: run it with ``PYTHONPATH`` on the old tree for the before figures.

    python benchmarks/fit_interference.py [--backbone test:tiny-clip] [--shots 16] [--size 512] [--clients 2]
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import torch
import uvicorn
from PIL import Image

import app
from app.core.config import Settings
from app.main import create_app

ADMIN, CLIENT = "bench-admin", "bench-client"


def texture(seed: int, size: int) -> bytes:
    """A PNG of a smooth texture with sensor noise (every 'good part' alike)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    rgb = np.stack([0.5 + 0.25 * np.sin(2 * np.pi * (3 * xx + 2 * yy)), 0.5 + 0.25 * np.cos(2 * np.pi * 4 * xx),
                    0.5 + 0.2 * np.sin(2 * np.pi * 4 * yy)], axis=-1)
    image = Image.fromarray((np.clip(rgb + rng.normal(0, 0.03, rgb.shape), 0, 1) * 255).astype(np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def summary(latencies: list[float]) -> dict:
    ms = [1000 * v for v in latencies]
    return {"n": len(ms), "p50_ms": round(percentile(ms, 50), 1), "p99_ms": round(percentile(ms, 99), 1),
            "max_ms": round(max(ms), 1) if ms else None}


def register(http: httpx.Client, category: str, shots: list[bytes]) -> float:
    started = time.perf_counter()
    files = [("files", (f"{i}.png", shot, "image/png")) for i, shot in enumerate(shots)]
    r = http.post(f"/v1/categories/{category}/shots", headers={"Authorization": f"Bearer {ADMIN}"},
                  data={"finetune": "false"}, files=files)
    if r.status_code != 201:
        raise SystemExit(f"registration of {category} failed: {r.status_code} {r.text}")
    return time.perf_counter() - started


def predict_loop(http: httpx.Client, query: bytes, stop: threading.Event, out: list[float]) -> None:
    while not stop.is_set():
        started = time.perf_counter()
        r = http.post("/v1/categories/a/predict?heatmap=none", headers={"Authorization": f"Bearer {CLIENT}"},
                      files=[("files", ("q.png", query, "image/png"))])
        if r.status_code != 200:
            raise SystemExit(f"predict failed: {r.status_code} {r.text}")
        out.append(time.perf_counter() - started)


def measure(http: httpx.Client, query: bytes, clients: int, until: Callable[[], object]) -> list[float]:
    """Latencies of ``clients`` closed-loop predict clients while ``until()`` runs."""
    stop, latencies = threading.Event(), []
    threads = [threading.Thread(target=predict_loop, args=(http, query, stop, latencies)) for _ in range(clients)]
    for thread in threads:
        thread.start()
    try:
        until()
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="test:tiny-clip")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shots", type=int, default=16, help="shots product B registers")
    parser.add_argument("--size", type=int, default=512, help="side of B's shots in pixels")
    parser.add_argument("--clients", type=int, default=2, help="closed-loop predict clients on product A")
    parser.add_argument("--registrations", type=int, default=1, help="registrations of fresh products B measured")
    parser.add_argument("--idle-seconds", type=float, default=5.0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as root:
        settings = Settings(_env_file=None, backbone=args.backbone, device=args.device, store=Path(root),
                            admin_keys=[ADMIN], client_keys=[CLIENT], max_shots=max(16, args.shots),
                            max_category_images=max(128, args.shots))
        server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=free_port(),
                                               log_level="warning", lifespan="on"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.05)
        base = f"http://127.0.0.1:{server.config.port}"
        try:
            with httpx.Client(base_url=base, timeout=3600) as http:
                register(http, "a", [texture(s, 224) for s in range(4)])
                query = texture(99, 224)
                measure(http, query, args.clients, lambda: time.sleep(1.0))  # warm-up
                idle = measure(http, query, args.clients, lambda: time.sleep(args.idle_seconds))
                seconds: list[float] = []

                def registrations() -> None:
                    for k in range(args.registrations):
                        shots = [texture(1000 * (k + 1) + s, args.size) for s in range(args.shots)]
                        seconds.append(register(http, f"b{k}", shots))

                during = measure(http, query, args.clients, registrations)
        finally:
            server.should_exit = True
            thread.join(30)
    code = Path(app.__file__).resolve().parent.parent  # the tree measured (PYTHONPATH picks it)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=code).stdout.strip() or "not a git checkout"
    except OSError:
        commit = "?"
    print(json.dumps({
        "backbone": args.backbone, "device": args.device, "host": platform.node(), "torch_threads":
        torch.get_num_threads(), "code": str(code), "commit": commit, "shots": args.shots, "size": args.size,
        "clients": args.clients, "registration_s": [round(s, 2) for s in seconds],
        "idle": summary(idle), "during_registration": summary(during),
    }, indent=1))


if __name__ == "__main__":
    main()
