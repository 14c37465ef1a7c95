"""What the inspection record adds to predict latency: recording off vs verdicts vs thumbnails, side by side.

Starts one ``clipshot serve`` per record mode (each with its own throwaway store), registers the same product on
each, then sends one-image predict requests at a fixed concurrency (default 8) in interleaved rounds (off,
verdicts, thumbnails, off, ...), so drifting machine load affects every mode alike. Only one server is loaded at a
time. Prints a markdown table: client-side p50 / p99 per mode, the added p50 against ``off`` (target < 5 %), the
server's CPU time per request (its ``process_cpu_seconds_total``, the record's writer thread included: on a shared
machine the wall-clock p50 moves by about 10 % between runs, the CPU cost much less), and the inspections each
server recorded and dropped (from its ``/metrics`` and ``GET .../inspections``).

    python benchmarks/record_overhead.py                          # efficientnet-lite0, CPU, 8 x 40 x 3 rounds
    python benchmarks/record_overhead.py --requests 16 --rounds 2   # a quick look

Images: MVTec AD bottle from ``../shared/data/mvtec_ad/bottle`` when present, else generated textures.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
from contextlib import ExitStack
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from http_latency import BENCH_ADMIN, BENCH_KEY, BOTTLE, load_images, local_server, percentile, run_level  # noqa: E402

MODES = ("off", "verdicts", "thumbnails")
PATH = "/v1/categories/product/predict"


def start(stack: ExitStack, mode: str, args: argparse.Namespace) -> str:
    """A server recording in ``mode`` (the mode reaches it through the environment it inherits)."""
    os.environ["CLIPSHOT_RECORD_MODE"] = mode
    server_args = argparse.Namespace(backbone=args.backbone, device=args.device, batch_wait_ms=2, batch_size=32,
                                     image_size=None, startup_timeout=300)
    return stack.enter_context(local_server(server_args))


def recorded(url: str) -> tuple[int, float]:
    """Inspections in the record (all pages) and those dropped, per the server's own answers."""
    headers = {"Authorization": f"Bearer {BENCH_ADMIN}"}
    count, cursor = 0, None
    while True:
        params = {"limit": 1000, **({"cursor": cursor} if cursor else {})}
        page = httpx.get(f"{url}/v1/categories/product/inspections", params=params, headers=headers).json()
        count += len(page["inspections"])
        if (cursor := page["next_cursor"]) is None:
            break
    metrics = httpx.get(f"{url}/metrics").text
    dropped = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                  if line.startswith("clipshot_records_dropped_total{"))
    return count, dropped


async def cpu_seconds(client: httpx.AsyncClient, url: str) -> float:
    """The server process's user + system CPU time (``process_cpu_seconds_total`` in its ``/metrics``)."""
    text = (await client.get(f"{url}/metrics")).text
    return next(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                if line.startswith("process_cpu_seconds_total "))


async def measure(urls: dict[str, str], images: list[tuple[str, bytes]], args: argparse.Namespace
                  ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Latencies per mode, and the server CPU seconds each mode's measured requests cost (its writer included):
    CPU time is what recording takes from predictions on a busy machine, and it is far less sensitive to other
    jobs on the machine than a wall-clock percentile."""
    latencies: dict[str, list[float]] = {mode: [] for mode in urls}
    cpu: dict[str, list[float]] = {mode: [] for mode in urls}  # per round
    headers = {"Authorization": f"Bearer {BENCH_KEY}"}
    async with httpx.AsyncClient(timeout=120) as client:
        for url in urls.values():  # warm-up: first forward, adapter load
            await run_level(client, url + PATH, images, args.concurrency, args.concurrency, "jpeg", headers)
        for _ in range(args.rounds):
            for mode, url in urls.items():
                before = await cpu_seconds(client, url)
                got, _, failures = await run_level(client, url + PATH, images, args.concurrency, args.requests,
                                                   "jpeg", headers)
                if failures:
                    raise SystemExit(f"{failures} predict requests failed in mode {mode}")
                await asyncio.sleep(0.5)  # the writer's thread finishes the round's rows (it is counted too)
                cpu[mode].append((await cpu_seconds(client, url) - before) / len(got))
                latencies[mode] += got
    return latencies, cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=BOTTLE, help="MVTec-style category folder")
    parser.add_argument("--backbone", default="imagenet:efficientnet-lite0")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--requests", type=int, default=40, help="requests per mode per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--images", type=int, default=20)
    args = parser.parse_args(argv)
    from app.client import Client

    shots = load_images(args.data / "train" / "good", "*.png", 4, seed=0)
    images = load_images(args.data / "test", "*/*.png", args.images, seed=1)
    with ExitStack() as stack:
        urls = {mode: start(stack, mode, args) for mode in MODES}
        for url in urls.values():
            with Client(url, BENCH_ADMIN) as admin:
                admin.register("product", [data for _, data in shots], finetune=False)
        latencies, cpu = asyncio.run(measure(urls, images, args))
        counts = {mode: recorded(url) for mode, url in urls.items()}
    base = percentile(latencies["off"], 50)
    print(f"\n{args.backbone} on {args.device}, concurrency {args.concurrency}, {args.rounds} rounds x "
          f"{args.requests} requests per mode (one image each)\n")
    print("| record_mode | p50 ms | p99 ms | added p50 | server CPU ms / request | added CPU, median of rounds "
          "[quartiles] | recorded | dropped |")
    print("|---|---|---|---|---|---|---|---|")
    for mode, values in latencies.items():
        p50, p99 = percentile(values, 50), percentile(values, 99)
        per_request = statistics.fmean(cpu[mode])
        added = "-" if mode == "off" else f"{100 * (p50 / base - 1):+.1f} %"
        # each round's CPU per request against the `off` server's in the same round: the machine's drift cancels
        ratios = [100 * (mine / off - 1) for mine, off in zip(cpu[mode], cpu["off"], strict=True)]
        quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
        added_cpu = "-" if mode == "off" else (f"{statistics.median(ratios):+.1f} % [{quartiles[0]:+.1f}, "
                                               f"{quartiles[2]:+.1f}]")
        count, dropped = counts[mode]
        print(f"| {mode} | {1000 * p50:.1f} | {1000 * p99:.1f} | {added} | {1000 * per_request:.1f} | {added_cpu} "
              f"| {count} | {dropped:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
