"""``clipshot predict``: score a folder (or files) against a running service or a local store.

Both modes go through the same HTTP pipeline: ``--url`` talks to a server with the Python client, and
``--store`` builds the service in-process (``create_app`` behind an in-memory transport, no socket), so
a local run decodes, limits, scores and encodes exactly as the server would. Results go out as CSV or
JSON, overlays and masks to folders. Exit codes: 0 all scored; 1 some images failed (each row says why);
2 the run could not start (bad arguments, unreachable service, wrong key, unknown product); 3 with
``--fail-on-anomaly`` when any image was anomalous.
"""

from __future__ import annotations

import argparse
import base64
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from app.cli.common import add_source_arguments

if TYPE_CHECKING:
    import httpx

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
FIELDS = ["file", "category", "adapter_version", "score", "threshold", "is_anomalous", "verdict", "sha256", "error"]
EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE, EXIT_ANOMALY = 0, 1, 2, 3
IMAGE_ERRORS = {400, 413, 415, 422}  # the service rejected an image (corrupt, too large, ...), not the run


def register(subparsers: Any, name: str, help_text: str) -> argparse.ArgumentParser:
    """Register ``predict`` on the console script's subparsers (nothing heavy imported: ``--help`` stays fast)."""
    parser = subparsers.add_parser(
        name, help=help_text,
        description="Score images against a product's active adapter, on a running service (--url, --key) or "
        "on a local adapter store (--store, --backbone). Writes one row per image (CSV or JSON); exit code 0 = "
        "all scored, 1 = some images failed, 2 = could not run, 3 = --fail-on-anomaly and an anomaly was found.",
    )
    parser.add_argument("inputs", nargs="+", type=Path, help="image files and/or folders (searched recursively)")
    parser.add_argument("--category", help="product to score against; omit for zero-shot (/v1/predict)")
    parser.add_argument("--object", dest="object_name", help="object name for zero-shot CLIP prompts")
    add_source_arguments(parser)
    out = parser.add_argument_group("output")
    out.add_argument("--out", default="-", help="result file, .csv or .json (default: CSV on stdout)")
    out.add_argument("--format", choices=["csv", "json"], help="output format (default: from --out's suffix)")
    out.add_argument("--overlays", type=Path, help="folder for the service's heatmap overlays (<name>.png)")
    out.add_argument("--masks", type=Path, help="folder for binary anomaly masks at the threshold (<name>.png)")
    parser.add_argument("--batch", type=int, default=8, help="images per request (default 8)")
    parser.add_argument("--fail-on-anomaly", action="store_true", help="exit 3 if any image is anomalous")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bar on stderr (default: when stderr is a terminal)")
    parser.set_defaults(func=run_predict)
    return parser


def collect_images(inputs: list[Path]) -> list[Path]:
    """Files as given plus every image under the folders, sorted; a missing input is an error."""
    found: list[Path] = []
    for item in inputs:
        if item.is_dir():
            found += sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif item.is_file():
            found.append(item)
        else:
            raise FileNotFoundError(f"{item} does not exist")
    if not found:
        raise ValueError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {', '.join(map(str, inputs))}")
    return found


def _fail(message: str) -> int:
    print(f"clipshot predict: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def run_predict(args: argparse.Namespace) -> int:
    """Validate everything, open the client (remote or in-process), score in batches, write results."""
    if args.url and args.store:
        return _fail("give --url (a running service) or --store (local), not both")
    if args.batch < 1:
        return _fail("--batch must be at least 1")
    if args.store and not args.store.is_dir():
        return _fail(f"--store {args.store} is not a directory")
    if args.out != "-" and not Path(args.out).resolve().parent.is_dir():
        return _fail(f"--out {args.out}: its folder does not exist")
    fmt = args.format or ("json" if str(args.out).lower().endswith(".json") else "csv")
    try:
        images = collect_images(args.inputs)
    except (FileNotFoundError, ValueError) as exc:
        return _fail(str(exc))

    import logging

    from app.client import ClipshotError

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request would drown the summary
    try:
        with _client(args) as client:
            rows = _score_all(client, args, images)
    except ClipshotError as exc:
        return _fail(exc.message + (f" (HTTP {exc.status})" if exc.status else ""))
    _write(rows, args.out, fmt)
    failed = sum(1 for r in rows if r["error"])
    anomalous = sum(1 for r in rows if r["verdict"] == "anomalous")
    print(f"clipshot predict: {len(rows) - failed} scored, {anomalous} anomalous, {failed} failed",
          file=sys.stderr)
    if failed:
        return EXIT_SOME_FAILED
    return EXIT_ANOMALY if args.fail_on_anomaly and anomalous else EXIT_OK


@contextmanager
def _client(args: argparse.Namespace) -> Iterator[Any]:
    from app.client import Client, ClipshotError

    if not args.store:
        with Client(args.url or "http://127.0.0.1:8000", args.key) as client:
            yield client
        return
    from pydantic import ValidationError
    from starlette.testclient import TestClient

    from app.core.config import Settings
    from app.main import StartupError, create_app, load_service_backbone

    overrides = {k: v for k, v in (("backbone", args.backbone), ("device", args.device)) if v}
    with tempfile.TemporaryDirectory(prefix="clipshot-predict-") as view:
        store_view(args.store, Path(view))
        try:  # local and keyless: this process is the only caller
            # never publishes to MQTT or records inspections itself: its outbox and record would live in the
            # temporary view and vanish
            settings = Settings(store=view, insecure_dev=True, admin_keys=[], client_keys=[], mqtt_host=None,
                                record_mode="off", **overrides)
            backbone = load_service_backbone(settings)
        except (ValidationError, StartupError) as exc:
            raise ClipshotError(0, "startup", str(exc).splitlines()[0]) from exc
        # TestClient is starlette's httpx2.Client: the same request/headers/close the Client uses
        with TestClient(create_app(settings, backbone=backbone), raise_server_exceptions=False) as http, \
                Client(f"local store {args.store}", http=cast("httpx.Client", http)) as client:
            yield client


def store_view(store: Path, view: Path) -> None:
    """Link every entry of ``store`` into ``view`` except the job database.

    The in-process service marks the jobs it finds queued/running as interrupted when it starts (it assumes
    it is the store's only server); through this view it gets a job database of its own, so scoring on the
    store of a running service leaves that service's fine-tunes alone. Bundles are only read.
    """
    for entry in store.iterdir():
        if not entry.name.startswith("jobs."):
            (view / entry.name).symlink_to(entry.resolve(), target_is_directory=entry.is_dir())


def _score_all(client: Any, args: argparse.Namespace, images: list[Path]) -> list[dict[str, Any]]:
    from tqdm import tqdm

    disable = None if args.progress is None else not args.progress
    rows: list[dict[str, Any]] = []
    with tqdm(total=len(images), unit="img", desc="predict", disable=disable, file=sys.stderr) as bar:
        for start in range(0, len(images), args.batch):
            batch = images[start:start + args.batch]
            rows += _score_batch(client, args, batch)
            bar.update(len(batch))
    return rows


def _score_batch(client: Any, args: argparse.Namespace, batch: list[Path]) -> list[dict[str, Any]]:
    """One request per heatmap kind needed; an image the service rejects is retried alone to name it."""
    from app.client import ClipshotError

    try:
        return _request(client, args, batch)
    except ClipshotError as exc:
        if exc.status not in IMAGE_ERRORS:
            raise
    rows = []
    for path in batch:
        try:
            rows += _request(client, args, [path])
        except ClipshotError as exc:
            if exc.status not in IMAGE_ERRORS:
                raise
            rows.append(_row(path, None, error=exc.message))
    return rows


def _request(client: Any, args: argparse.Namespace, batch: list[Path]) -> list[dict[str, Any]]:
    from app.client import anomaly_mask

    def call(heatmap: str) -> Any:
        if args.category:
            return client.predict(args.category, batch, heatmap=heatmap)
        return client.predict_zero_shot(batch, object_name=args.object_name, heatmap=heatmap)

    answer = call("png" if args.overlays else "raw" if args.masks else "none")
    if args.overlays:  # the service's own encoding, written as sent (no decode / re-encode)
        for path, pred in zip(batch, answer.predictions, strict=True):
            heat = pred.heatmap
            target = _target(args.overlays, path, args.inputs, "." + heat.encoding)
            target.write_bytes(base64.b64decode(heat.data))
    if args.masks:
        raw = call("raw") if args.overlays else answer
        from PIL import Image

        for path, pred in zip(batch, raw.predictions, strict=True):
            if pred.threshold is not None:
                with Image.open(path) as image:
                    size = image.size
                mask = anomaly_mask(pred, size=size)
                Image.fromarray(mask.astype("uint8") * 255, "L").save(_target(args.masks, path, args.inputs, ".png"))
    return [_row(path, pred) for path, pred in zip(batch, answer.predictions, strict=True)]


def _target(folder: Path, source: Path, roots: list[Path], suffix: str) -> Path:
    """``folder/<path relative to its input folder><suffix>``: same-named files in subfolders do not collide."""
    relative = Path(source.name)
    for root in roots:
        if root.is_dir() and source.is_relative_to(root):
            relative = source.relative_to(root)
            break
    target = folder / relative.with_suffix(suffix)
    target.parent.mkdir(parents=True, exist_ok=True)
    return target


def _row(path: Path, pred: Any, error: str = "") -> dict[str, Any]:
    if pred is None:
        return {**dict.fromkeys(FIELDS, None), "file": str(path), "verdict": "error", "error": error}
    verdict = "unknown" if pred.is_anomalous is None else "anomalous" if pred.is_anomalous else "normal"
    return {"file": str(path), "category": pred.category, "adapter_version": pred.adapter_version,
            "score": pred.score, "threshold": pred.threshold, "is_anomalous": pred.is_anomalous,
            "verdict": verdict, "sha256": pred.sha256, "error": error}


def _write(rows: list[dict[str, Any]], out: str, fmt: str) -> None:
    import csv
    import json

    stream = sys.stdout if out == "-" else open(out, "w", newline="", encoding="utf-8")  # noqa: SIM115
    try:
        if fmt == "json":
            json.dump(rows, stream, indent=1)
            stream.write("\n")
        else:
            writer = csv.DictWriter(stream, fieldnames=FIELDS)
            writer.writeheader()
            writer.writerows({k: "" if v is None else v for k, v in r.items()} for r in rows)
    finally:
        if stream is not sys.stdout:
            stream.close()
