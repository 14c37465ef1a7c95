"""Image arrival -> verdict on the MQTT broker, end to end on loopback: the latency a line's MES sees.

A real ``clipshot serve`` (publishing to a real Mosquitto) and a subscriber; images go in two ways, one at a time:
``http``: a client POSTs the image (latency from the request's start to the message's arrival); ``folder``:
``clipshot watch --url`` on a folder, each image renamed into it as an FTP upload finishes (latency from the
rename to the message), so the hot folder's ``--settle-s`` quiet period is part of it.

    python benchmarks/line_latency.py                 # MVTec AD bottle (or generated images), efficientnet-lite0
    python benchmarks/line_latency.py --images 10 --settle-s 0.1 0.5

Needs ``mosquitto`` on PATH; prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from http_latency import BENCH_ADMIN, BENCH_KEY, BOTTLE, REPO, load_images, local_server, percentile

sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from mqtt_broker import Broker  # noqa: E402

from app.client import Client  # noqa: E402


class Arrivals:
    """Subscriber recording when each part id's verdict arrived."""

    def __init__(self, port: int) -> None:
        import paho.mqtt.client as mqtt

        self.times: dict[str, float] = {}
        self._event = threading.Condition()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench")
        self.client.on_connect = lambda c, *_: c.subscribe("clipshot/#", qos=1)
        self.client.on_message = self._message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _message(self, client, userdata, message) -> None:
        now = time.perf_counter()
        with self._event:
            self.times.setdefault(json.loads(message.payload)["part_id"], now)
            self._event.notify_all()

    def wait(self, part: str, timeout: float = 60) -> float:
        with self._event:
            if not self._event.wait_for(lambda: part in self.times, timeout):
                raise SystemExit(f"no verdict for {part} within {timeout} s")
            return self.times[part]


def http_latencies(url: str, images: list[tuple[str, bytes]], arrivals: Arrivals) -> list[float]:
    out = []
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {BENCH_KEY}"}, timeout=120) as http:
        for i, (name, data) in enumerate(images):
            part = f"http-{i}"
            start = time.perf_counter()
            r = http.post("/v1/categories/product/predict?heatmap=none", files=[("files", (name, data))],
                          data={"part_id": part})
            r.raise_for_status()
            out.append(arrivals.wait(part) - start)
    return out


def folder_latencies(url: str, images: list[tuple[str, bytes]], arrivals: Arrivals, settle_s: float,
                     root: Path) -> list[float]:
    folder, staging = root / f"cam-{settle_s}", root / f"staging-{settle_s}"
    folder.mkdir()
    staging.mkdir()
    command = [sys.executable, "-m", "app.cli", "watch", str(folder), "--category", "product", "--url", url,
               "--key", BENCH_KEY, "--settle-s", str(settle_s), "--max-files", str(len(images))]
    proc = subprocess.Popen(command, cwd=REPO, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stderr is not None
    assert "watching" in proc.stderr.readline()
    out = []
    for i, (_, data) in enumerate(images):
        part = f"s{settle_s}-{i}"
        (staging / f"{part}.png").write_bytes(data)
        start = time.perf_counter()
        os.replace(staging / f"{part}.png", folder / f"{part}.png")  # the upload is complete: it appears
        out.append(arrivals.wait(part) - start)
    proc.wait(timeout=60)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=BOTTLE, help="MVTec-style category folder")
    parser.add_argument("--backbone", default="imagenet:efficientnet-lite0")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=20, help="images per way in")
    parser.add_argument("--settle-s", type=float, nargs="+", default=[0.1, 0.5], help="hot folder quiet periods")
    args = parser.parse_args(argv)
    shots = load_images(args.data / "train" / "good", "*.png", 4, seed=0)
    images = load_images(args.data / "test", "*/*.png", args.images, seed=1)
    with tempfile.TemporaryDirectory(prefix="clipshot-line-bench-") as tmp:
        broker = Broker(Path(tmp) / "broker")
        broker.start()
        os.environ.update(CLIPSHOT_MQTT_HOST="127.0.0.1", CLIPSHOT_MQTT_PORT=str(broker.port))
        server_args = argparse.Namespace(backbone=args.backbone, device=args.device, batch_wait_ms=2,
                                         batch_size=32, image_size=None, startup_timeout=300)
        try:
            with local_server(server_args) as url:
                with Client(url, BENCH_ADMIN) as admin:
                    admin.register("product", [data for _, data in shots], finetune=False)
                arrivals = Arrivals(broker.port)
                http_latencies(url, images[:2], arrivals)  # warm-up: first forward, adapter load
                rows = [("http", http_latencies(url, images, arrivals))]
                for settle in args.settle_s:
                    rows.append((f"folder, settle {settle} s", folder_latencies(url, images, arrivals, settle,
                                                                                 Path(tmp))))
        finally:
            broker.kill()
    print(f"| way in ({args.backbone}, {args.device}) | images | p50 ms | p95 ms | max ms |")
    print("|---|---:|---:|---:|---:|")
    for name, values in rows:
        ms = [v * 1000 for v in values]
        print(f"| {name} | {len(ms)} | {percentile(ms, 50):.0f} | {percentile(ms, 95):.0f} | {max(ms):.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
