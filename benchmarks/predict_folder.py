"""`clipshot predict` on a whole folder, as an operator runs it: wall time of the command (process start,
imports and model load included) against a running service and on a local store, and how many verdicts
match the folder's ground truth (MVTec layout: ``test/good`` is good, every other folder defective).

    python benchmarks/predict_folder.py                       # MVTec AD bottle, efficientnet-lite0, CPU
    python benchmarks/predict_folder.py --data ../shared/data/mvtec_ad/bottle --shots 4 --batch 8

Needs the data set (``../shared/data/mvtec_ad/bottle`` by default); prints a markdown table.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from http_latency import BENCH_ADMIN, BENCH_KEY, BOTTLE, REPO, local_server

sys.path.insert(0, str(REPO))

from app.client import Client  # noqa: E402


def correct_fraction(results: Path, test_root: Path) -> float:
    with open(results, newline="") as f:
        rows = list(csv.DictReader(f))
    right = sum((Path(r["file"]).parent.name != "good") == (r["verdict"] == "anomalous") for r in rows)
    return right / len(rows)


def timed(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=BOTTLE, help="MVTec-style category folder")
    parser.add_argument("--backbone", default="imagenet:efficientnet-lite0")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shots", type=int, default=4, help="good shots from train/good to register")
    parser.add_argument("--batch", type=int, default=8, help="images per request")
    args = parser.parse_args(argv)
    if not (args.data / "test").is_dir():
        raise SystemExit(f"no data at {args.data} (expects test/ and train/good/)")
    shots = sorted((args.data / "train" / "good").glob("*.png"))[:args.shots]
    test_dir = args.data / "test"
    count = sum(1 for p in test_dir.rglob("*.png"))
    cli = [sys.executable, "-m", "app.cli.main", "predict", str(test_dir), "--category", "product",
           "--batch", str(args.batch), "--no-progress"]
    server_args = argparse.Namespace(backbone=args.backbone, device=args.device, batch_wait_ms=2, batch_size=32,
                                     image_size=None, startup_timeout=300)
    rows = ["| mode | images | wall s | images / s | verdicts right |", "|---|---:|---:|---:|---:|"]
    with tempfile.TemporaryDirectory(prefix="clipshot-predict-bench-") as tmp, local_server(server_args) as url:
        out = Path(tmp)
        with Client(url, BENCH_ADMIN) as admin:
            admin.register("product", shots, finetune=False)
        remote = [*cli, "--url", url, "--key", BENCH_KEY]
        for label, extra in (("--url", []), ("--url --overlays", ["--overlays", str(out / "overlays")])):
            seconds = timed([*remote, *extra, "--out", str(out / "remote.csv")])
            rows.append(f"| `{label}` | {count} | {seconds:.1f} | {count / seconds:.1f} | "
                        f"{100 * correct_fraction(out / 'remote.csv', test_dir):.0f} % |")
        # The same shots in a local store, then the in-process path (model load inside the command).
        from starlette.testclient import TestClient

        from app.core.config import Settings
        from app.main import create_app

        settings = Settings(_env_file=None, backbone=args.backbone, device=args.device, store=out / "store",
                            insecure_dev=True)
        with TestClient(create_app(settings)) as http, Client("in-process", http=http) as local:
            local.register("product", shots, finetune=False)
        seconds = timed([*cli, "--store", str(out / "store"), "--backbone", args.backbone, "--device", args.device,
                         "--out", str(out / "local.csv")])
        rows.append(f"| `--store` | {count} | {seconds:.1f} | {count / seconds:.1f} | "
                    f"{100 * correct_fraction(out / 'local.csv', test_dir):.0f} % |")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
