"""What the Ray Serve layout costs and gives: ``clipshot serve`` vs ``clipshot serve-ray`` (1 and 2 replicas).

Each layout runs as a real process on loopback; 16 products are registered through the API (memory adapters),
then ``--concurrency`` closed-loop clients send one-image predictions round-robin over the products for
``--seconds``. Printed as a markdown table: images/s, client p50/p99, 503s (retryable), and the affinity share
(per product, the fraction of its requests that landed on its most frequent replica; 1.0 = perfect affinity,
1/replicas = random). Several replicas need PostgreSQL: a throwaway cluster is started (``tests/pg_cluster.py``,
Debian ``postgresql``) unless ``--job-db`` names one.

    python benchmarks/ray_serve.py                                   # tiny CLIP, CPU
    python benchmarks/ray_serve.py --backbone imagenet:efficientnet-lite0 --seconds 60
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import sys
import tempfile
import time
from collections import Counter, defaultdict
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
import pg_cluster  # noqa: E402
from live_server import ADMIN, CLIENT, live_server  # noqa: E402


def image(seed: int, size: int = 128) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray((96 + rng.integers(0, 64, (size, size, 3))).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@contextmanager
def server(layout: str, replicas: int, args: argparse.Namespace, job_db: str | None):
    """A running ``clipshot serve`` or ``serve-ray`` (tests/live_server.py); yields its base URL."""
    env = {"CLIPSHOT_BACKBONE": args.backbone, "CLIPSHOT_DEVICE": args.device,
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count())),  # torch's default, not 1
           "CLIPSHOT_RAY_MIN_REPLICAS": str(replicas), "CLIPSHOT_RAY_MAX_REPLICAS": str(replicas),
           "CLIPSHOT_RAY_NUM_CPUS": str(round(1 / replicas, 2)), "RAY_USAGE_STATS_ENABLED": "0",
           **({"CLIPSHOT_JOB_DB": job_db} if job_db and replicas > 1 else {})}
    with tempfile.TemporaryDirectory(prefix="clipshot-bench-") as folder, \
            live_server(Path(folder), command=layout, startup_timeout=300, stop_timeout=60, **env) as running:
        yield running.base


async def measure(url: str, args: argparse.Namespace) -> dict[str, float]:
    products = [f"p{i:02d}" for i in range(args.products)]
    headers = {"Authorization": f"Bearer {ADMIN}"}
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        for i, product in enumerate(products):
            shots = [("files", (f"s{k}.png", image(100 * i + k), "image/png")) for k in range(4)]
            r = await client.post(f"/v1/categories/{product}/shots", headers=headers, files=shots,
                                  data={"finetune": "false"})
            r.raise_for_status()
        latencies: list[float] = []
        statuses: Counter[int] = Counter()
        landed: dict[str, Counter[str]] = defaultdict(Counter)
        stop = time.monotonic() + args.seconds
        auth = {"Authorization": f"Bearer {CLIENT}"}

        async def line(k: int) -> None:
            n = k
            files = [("files", ("part.png", image(10_000 + k), "image/png"))]
            while time.monotonic() < stop:
                product = products[n % len(products)]
                n += 1
                start = time.perf_counter()
                r = await client.post(f"/v1/categories/{product}/predict?heatmap=none", files=files, headers=auth)
                statuses[r.status_code] += 1
                if r.status_code == 200:
                    latencies.append(time.perf_counter() - start)
                    landed[product][r.headers.get("x-clipshot-replica", "?")] += 1

        began = time.monotonic()
        await asyncio.gather(*(line(k) for k in range(args.concurrency)))
        elapsed = time.monotonic() - began
    ms = np.asarray(latencies) * 1000
    affinity = np.mean([c.most_common(1)[0][1] / sum(c.values()) for c in landed.values()])
    return {"images_s": len(latencies) / elapsed, "p50": float(np.percentile(ms, 50)),
            "p99": float(np.percentile(ms, 99)), "errors": sum(v for k, v in statuses.items() if k != 200),
            "affinity": float(affinity), "replicas": len({r for c in landed.values() for r in c})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="test:tiny-clip")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--products", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2], help="serve-ray replica counts")
    parser.add_argument("--job-db", default=None, help="PostgreSQL URL (default: start a throwaway cluster)")
    args = parser.parse_args()
    pg_dir = None
    job_db = args.job_db
    if job_db is None and max(args.replicas) > 1:
        pg_dir = Path(tempfile.mkdtemp(prefix="clipshot-pg-", dir="/tmp"))
        job_db = pg_cluster.start(pg_dir)
    rows = []
    try:
        for layout, replicas in [("serve", 1)] + [("serve-ray", n) for n in args.replicas]:
            with server(layout, replicas, args, job_db) as url:
                result = asyncio.run(measure(url, args))
            rows.append((layout, replicas, result))
            print(f"{layout} x{replicas}: {result}", file=sys.stderr)
    finally:
        if pg_dir is not None:
            pg_cluster.stop(pg_dir)
    print(f"\n{args.backbone} on {args.device}, {args.products} products round-robin, concurrency {args.concurrency}, "
          f"{args.seconds:.0f} s per layout\n")
    print("| layout | replicas | images/s | p50 ms | p99 ms | non-200 | replicas seen | affinity share |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for layout, replicas, r in rows:
        print(f"| `clipshot {layout}` | {replicas} | {r['images_s']:.1f} | {r['p50']:.0f} | {r['p99']:.0f} "
              f"| {r['errors']} | {r['replicas']} | {r['affinity']:.2f} |")


if __name__ == "__main__":
    main()
