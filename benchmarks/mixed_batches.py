"""Mixed-product traffic: 16 products round-robin vs 1 product at concurrency 16 (not a test: README numbers).

The service's own batcher, device worker, adapter cache and detector run in-process (no HTTP: on a small CPU
box decoding and the event loop would drown the forward pass this measures). 16 closed-loop clients each send
one preprocessed image at a time; in the mixed runs client k asks for product (k + i) mod 16 on its i-th request,
so every window holds all products. Dispatch variants:

* ``per-product``: the old batcher, one forward per product in the window (for comparison);
* ``mixed``: one forward per window (``Detector.forward_mixed``); with LoRA products the deltas are computed as
  ``group`` (per adapter gather/scatter), ``gather`` (per-sample bmm) or ``split`` (one forward per LoRA product).

    python benchmarks/mixed_batches.py [--backbones test:tiny-clip imagenet:efficientnet-lite0] [--requests 16]
        [--device cuda --precision bf16]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from app.metrics import Metrics
from app.serving.adapter_cache import AdapterCache
from app.serving.batcher import Batcher, _Item
from app.serving.device_worker import DeviceWorker
from clipshot import lora
from clipshot.backbone import load_backbone
from clipshot.detector import Detector
from model_store import AdapterStore
from model_store.adapters import save_adapter

PRODUCTS = 16
CONCURRENCY = 16


class PerProductBatcher(Batcher):
    """The batcher as it was: a window is split into one device task per product."""

    def _chunks(self, batch: list[_Item]) -> list[list[_Item]]:
        groups: dict[str, list[_Item]] = {}
        for item in batch:
            groups.setdefault(item.adapter.uid, []).append(item)
        return list(groups.values())


def texture(seed: int, size: int = 96) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    rgb = np.stack([0.5 + 0.25 * np.sin(2 * np.pi * (3 * xx + 2 * yy + seed / 7)),
                    0.5 + 0.25 * np.cos(2 * np.pi * 4 * xx), 0.5 + 0.2 * np.sin(2 * np.pi * 4 * yy)], axis=-1)
    return Image.fromarray((np.clip(rgb + rng.normal(0, 0.03, rgb.shape), 0, 1) * 255).astype(np.uint8))


def build_products(detector: Detector, root: Path, with_lora: bool) -> list:
    """16 products (memory adapters, + a rank-8 LoRA with non-zero B when ``with_lora``) saved in a store."""
    store = AdapterStore(root)
    adapters = []
    for p in range(PRODUCTS):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            adapter = detector.fit_memory([texture(100 * p + s) for s in range(4)], category=f"p{p}", text=False,
                                          calibration_views=0)
        if with_lora:
            visual, spec = detector.backbone.visual, lora.LoraSpec()
            lora.add_adapter(visual, "shape", spec)
            shapes = lora.state(visual, "shape")
            lora.remove_adapter(visual, "shape")
            adapter = dataclasses.replace(adapter, lora=spec,
                                          lora_state={k: torch.full_like(v, 0.01) for k, v in shapes.items()})
        save_adapter(store, detector, adapter)
        adapters.append(adapter)
    return adapters


async def run(detector: Detector, adapters: list, pixels: torch.Tensor, products: int, requests: int,
              batcher_cls: type[Batcher]) -> dict[str, float]:
    metrics = Metrics()
    worker = DeviceWorker(metrics)
    worker.start()
    cache = AdapterCache(AdapterStore(Path(tempfile.gettempdir())), detector, metrics, worker,
                         device_capacity=PRODUCTS, cpu_capacity=PRODUCTS)
    batcher = batcher_cls(detector, worker, cache, metrics, max_batch_size=32, max_wait_ms=5)
    await batcher.start()
    latencies: list[float] = []
    sizes: list[int] = []

    async def client(k: int) -> None:
        for i in range(requests):
            adapter = adapters[(k + i) % products]
            start = time.perf_counter()
            result = await batcher.submit(adapter, pixels[(k + i) % len(pixels)], adapter.category)
            latencies.append(time.perf_counter() - start)
            sizes.append(result.batch_size)

    for k in range(2):  # warm-up: residency, lazy inits
        await batcher.submit(adapters[k % products], pixels[0], "warm")
    started = time.perf_counter()
    await asyncio.gather(*(client(k) for k in range(CONCURRENCY)))
    elapsed = time.perf_counter() - started
    await batcher.stop()
    worker.stop()
    latencies.sort()
    images = len(latencies)
    forwards = sum(1 / s for s in sizes)  # each image is 1/size of its forward
    return {"mean_batch": images / forwards, "images_s": images / elapsed,
            "p50_ms": 1000 * statistics.median(latencies),
            "p99_ms": 1000 * latencies[min(images - 1, int(0.99 * images))]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="+", default=["test:tiny-clip", "imagenet:efficientnet-lite0"])
    parser.add_argument("--requests", type=int, default=16, help="requests per client (x16 clients)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", help="backbone precision (bf16 on a GPU: what serving runs)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steadier on a shared box)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}, device {args.device}, precision {args.precision}, concurrency {CONCURRENCY}\n")
    print("| backbone | products | adapters | dispatch | mean batch | images/s | p50 ms | p99 ms |")
    print("|---|---:|---|---|---:|---:|---:|---:|")
    for spec in args.backbones:
        backbone = load_backbone(spec, device=args.device, precision=args.precision)
        pixels = backbone.preprocess([texture(9000 + i) for i in range(8)]).cpu()
        loras = [False, True] if backbone.supports_text else [False]
        for with_lora in loras:
            with tempfile.TemporaryDirectory() as root:
                adapters = build_products(Detector(backbone), Path(root), with_lora)
                modes = ["gather", "group", "split"] if with_lora else ["gather"]
                cases = [(1, "mixed", "gather", Batcher)]
                cases += [(PRODUCTS, "per-product", "gather", PerProductBatcher)]
                cases += [(PRODUCTS, "mixed", m, Batcher) for m in modes]
                for products, dispatch, mode, cls in cases:
                    detector = Detector(backbone, mixed_lora=mode)
                    row = asyncio.run(run(detector, adapters, pixels, products, args.requests, cls))
                    name = dispatch if dispatch == "per-product" or not with_lora or products == 1 else \
                        f"mixed ({mode})"
                    kind = "memory + LoRA" if with_lora else "memory"
                    print(f"| `{spec}` | {products} | {kind} | {name} | {row['mean_batch']:.1f} | "
                          f"{row['images_s']:.0f} | {row['p50_ms']:.0f} | {row['p99_ms']:.0f} |", flush=True)
                for adapter in adapters:
                    Detector(backbone).detach(adapter)


if __name__ == "__main__":
    main()
