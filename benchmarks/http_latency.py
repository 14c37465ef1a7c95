"""HTTP end-to-end latency and throughput of the predict endpoint, with the server-side stage split.

Starts ``clipshot serve`` on a free loopback port (or targets ``--url``), registers a category from
good shots (memory adapter, no fine-tune), then sends one-image predict requests at each concurrency
level (default 1, 8, 64) and prints a markdown table: client-side p50/p99 latency and throughput,
plus per-image decode/preprocess/forward/postprocess means and the mean batch size read from the
server's ``/metrics`` (deltas per level, so earlier levels do not leak into later ones).

    python benchmarks/http_latency.py                                  # efficientnet-lite0, CPU
    python benchmarks/http_latency.py --backbone test:tiny-clip --requests 32
    python benchmarks/http_latency.py --device cuda --backbone open_clip:ViT-B-16-plus-240:/w.safetensors
    python benchmarks/http_latency.py --url http://host:8000 --key CLIENT --admin-key ADMIN
    python benchmarks/http_latency.py --device cpu --runtimes torch onnxruntime openvino --concurrency 1 8

With ``--runtimes`` one local server per feature runtime (``CLIPSHOT_RUNTIME``) is started in turn, each with a
fresh store (its first requests include the export, inside the warm-up) and one table row per runtime and level.

Images: MVTec AD bottle from ``../shared/data/mvtec_ad/bottle`` when present, else generated textures;
``--dataset DIR`` takes shots from ``DIR/train/good`` and test images from ``DIR/test/*/`` (PNG or JPEG), e.g.
``--dataset ../shared/data/bsdata/ball_screw``.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parent.parent
BOTTLE = REPO.parent / "shared" / "data" / "mvtec_ad" / "bottle"
STAGES = ("decode", "preprocess", "forward", "postprocess")
BENCH_KEY, BENCH_ADMIN = "bench-client", "bench-admin"


def generated(count: int, seed: int, size: int = 256) -> list[tuple[str, bytes]]:
    """Smooth textures (+ a dark square on odd ones): stand-ins when the MVTec data is absent."""
    out = []
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(count):
        rng = np.random.default_rng(seed + i)
        rgb = np.stack([0.5 + 0.25 * np.sin(2 * np.pi * (3 * xx + 2 * yy)), 0.5 + 0.25 * np.cos(2 * np.pi * 4 * xx),
                        0.5 + 0.2 * np.sin(2 * np.pi * 4 * yy)], axis=-1) + rng.normal(0, 0.03, (size, size, 3))
        pixels = (np.clip(rgb, 0, 1) * 255).astype(np.uint8)
        if i % 2:
            pixels[size // 3: size // 2, size // 3: size // 2] = 0
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        out.append((f"gen{seed + i}.png", buffer.getvalue()))
    return out


def load_images(pattern_root: Path, pattern: str, limit: int, seed: int) -> list[tuple[str, bytes]]:
    found = sorted(p for p in pattern_root.glob(pattern) if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    return [(p.name, p.read_bytes()) for p in found[:limit]] if pattern_root.is_dir() and found else generated(limit,
                                                                                                            seed)


def mime(name: str) -> str:
    return "image/png" if name.lower().endswith(".png") else "image/jpeg"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def local_server(args: argparse.Namespace, runtime: str | None = None):
    """``python -m app.cli serve`` on loopback with a throwaway store; yields its base URL."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="clipshot-bench-") as store:
        env = {**os.environ, "CLIPSHOT_BACKBONE": args.backbone, "CLIPSHOT_DEVICE": args.device,
               "CLIPSHOT_STORE": store, "CLIPSHOT_CLIENT_KEYS": BENCH_KEY, "CLIPSHOT_ADMIN_KEYS": BENCH_ADMIN,
               "CLIPSHOT_MAX_BATCH_WAIT_MS": str(args.batch_wait_ms), "CLIPSHOT_MAX_BATCH_SIZE": str(args.batch_size)}
        if args.image_size:
            env["CLIPSHOT_IMAGE_SIZE"] = str(args.image_size)
        if runtime:
            env["CLIPSHOT_RUNTIME"] = runtime
        log = open(Path(store) / "server.log", "w+")  # noqa: SIM115 - closed below, after the process
        command = [sys.executable, "-m", "app.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
                   "--log-level", "warning"]
        proc = subprocess.Popen(command, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + args.startup_timeout
            while True:
                if proc.poll() is not None:
                    log.seek(0)
                    raise SystemExit(f"server exited during startup:\n{log.read()}")
                try:
                    if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit("server did not become ready in time")
                time.sleep(0.5)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()


def stage_totals(text: str) -> dict[str, float]:
    """Cumulative sums/counts of the families the table needs, summed over categories."""
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in ("clipshot_inference_stage_seconds_sum", "clipshot_inference_stage_seconds_count"):
                key = f"{s.labels['stage']}_{s.name.rsplit('_', 1)[1]}"
                totals[key] = totals.get(key, 0.0) + s.value
            elif s.name == "clipshot_batch_forward_seconds_sum":  # per batch: summed, then shared per image
                totals["forward_sum"] = totals.get("forward_sum", 0.0) + s.value
            elif s.name in ("clipshot_batch_size_sum", "clipshot_batch_size_count"):
                totals[s.name] = s.value
    return totals


async def run_level(client: httpx.AsyncClient, path: str, images: list[tuple[str, bytes]], concurrency: int,
                    requests: int, heatmap: str, headers: dict[str, str]) -> tuple[list[float], float, int]:
    """``requests`` one-image predicts from ``concurrency`` workers; returns latencies (s), wall time, failures."""
    latencies: list[float] = []
    failures = 0
    counter = iter(range(requests))

    async def worker() -> None:
        nonlocal failures
        for i in counter:
            name, data = images[i % len(images)]
            start = time.perf_counter()
            r = await client.post(path, params={"heatmap": heatmap}, headers=headers,
                                  files=[("files", (name, data, mime(name)))])
            latencies.append(time.perf_counter() - start)
            failures += r.status_code != 200

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, time.perf_counter() - start, failures


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


async def benchmark(url: str, args: argparse.Namespace) -> list[str]:
    """Table rows (without the runtime column), one per concurrency level."""
    headers = {"Authorization": f"Bearer {args.key}"}
    path = f"/v1/categories/{args.category}/predict"
    test_images = load_images(args.dataset / "test", "*/*", args.max_images, seed=100)
    limits = httpx.Limits(max_connections=max(args.concurrency) + 4)
    async with httpx.AsyncClient(base_url=url, timeout=args.timeout, limits=limits) as client:
        name, data = test_images[0]
        probe = await client.post(path, headers=headers, files=[("files", (name, data, mime(name)))])
        if probe.status_code == 404:
            shots = load_images(args.dataset / "train" / "good", "*", args.shots, seed=0)
            r = await client.post(f"/v1/categories/{args.category}/shots", data={"finetune": "false"},
                                  headers={"Authorization": f"Bearer {args.admin_key}"},
                                  files=[("files", (n, d, mime(n))) for n, d in shots])
            if r.status_code != 201:
                raise SystemExit(f"could not register {args.category!r}: {r.status_code} {r.text}")
        await run_level(client, path, test_images, 2, args.warmup, args.heatmap, headers)
        rows = []
        for concurrency in args.concurrency:
            before = stage_totals((await client.get("/metrics", headers=headers)).text)
            count = max(args.requests, 2 * concurrency)
            latencies, wall, failed = await run_level(client, path, test_images, concurrency, count, args.heatmap,
                                                      headers)
            after = stage_totals((await client.get("/metrics", headers=headers)).text)
            delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
            images = max(delta.get("clipshot_batch_size_sum", 0.0), 1.0)
            batches = max(delta.get("clipshot_batch_size_count", 0.0), 1.0)
            per_image = [1000 * delta.get(f"{s}_sum", 0.0) / images for s in STAGES]
            rows.append(f"| {concurrency} | {count} | {failed} | {1000 * percentile(latencies, 50):.1f} | "
                        f"{1000 * percentile(latencies, 99):.1f} | {count / wall:.1f} | {images / batches:.1f} | "
                        + " | ".join(f"{v:.2f}" for v in per_image) + " |")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="benchmark a running server instead of starting one")
    parser.add_argument("--key", default=BENCH_KEY, help="client key (with --url)")
    parser.add_argument("--admin-key", default=BENCH_ADMIN, help="admin key to register the category if missing")
    parser.add_argument("--category", default="bench-bottle")
    parser.add_argument("--dataset", type=Path, default=BOTTLE,
                        help="folder with train/good/ shots and test/*/ images (default: MVTec AD bottle)")
    parser.add_argument("--backbone", default=os.environ.get("CLIPSHOT_BACKBONE", "imagenet:efficientnet-lite0"))
    parser.add_argument("--device", default=os.environ.get("CLIPSHOT_DEVICE", "auto"))
    parser.add_argument("--image-size", type=int, default=None, help="backbone input size (default: native)")
    parser.add_argument("--batch-size", type=int, default=32, help="server max_batch_size")
    parser.add_argument("--batch-wait-ms", type=float, default=5.0, help="server max_batch_wait_ms")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--requests", type=int, default=64, help="requests per level (at least 2 x concurrency)")
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--shots", type=int, default=8)
    parser.add_argument("--max-images", type=int, default=32, help="distinct test images cycled through")
    parser.add_argument("--heatmap", choices=["jpeg", "png", "mask", "regions", "raw", "none"], default="png")
    parser.add_argument("--timeout", type=float, default=120.0, help="per-request timeout (s)")
    parser.add_argument("--startup-timeout", type=float, default=300.0)
    parser.add_argument("--runtimes", nargs="+", choices=["torch", "onnxruntime", "openvino"], default=None,
                        help="start one local server per feature runtime (CLIPSHOT_RUNTIME; CPU, fp32)")
    args = parser.parse_args(argv)
    if args.url and args.runtimes:
        parser.error("--runtimes starts its own servers; it cannot be combined with --url")
    source = str(args.dataset) if args.dataset.is_dir() else "generated textures"
    rows: list[str] = []
    if args.url:
        rows = [f"| as served {row}" for row in asyncio.run(benchmark(args.url.rstrip("/"), args))]
        target = args.url
    else:
        for runtime in args.runtimes or [None]:
            with local_server(args, runtime) as url:
                rows += [f"| {runtime or 'default'} {row}" for row in asyncio.run(benchmark(url, args))]
        target = f"local server, backbone {args.backbone}, device {args.device}"
    header = ("| runtime | concurrency | requests | failed | p50 ms | p99 ms | req/s | mean batch | "
              + " | ".join(f"{s} ms/img" for s in STAGES) + " |")
    print(f"clipshot HTTP latency: {target}; images: {source}; heatmap={args.heatmap}; one image per request\n")
    print("\n".join([header, "|" + "---|" * (8 + len(STAGES)), *rows]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
