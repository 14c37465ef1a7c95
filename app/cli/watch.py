"""``clipshot watch DIR --category NAME``: a hot folder for cameras (``app.cli.hot_folder`` does the watching).

Each complete image is scored like ``clipshot predict`` scores it, against a running service (``--url``) or a
local store in-process (``--store``), through the same client; the verdict goes into a JSON sidecar next to the
image in ``done/`` (or ``failed/`` when the service rejects the image), and with ``--mqtt`` to the broker set by
the ``CLIPSHOT_MQTT_*`` variables (outbox in ``DIR/.clipshot``). Against a service that publishes itself, leave
``--mqtt`` off: the part id (the file's stem), line and camera are sent along, and the service publishes them.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from app.cli.common import CliError, add_source_arguments

POLL_S = 0.05  # how often the folder's candidates are looked at; inotify events arrive in between
OUTAGE_STATUSES = {0, 429, 500, 502, 503, 504}  # not the image's fault: keep it and try again


def register(subparsers: Any, name: str, help_text: str) -> argparse.ArgumentParser:
    """Register ``watch`` on the console script's subparsers (nothing heavy imported)."""
    parser = subparsers.add_parser(
        name, help=help_text,
        description="Inspect images as cameras write them into FOLDER: each complete file (closed by its writer "
        "and unchanged for --settle-s) is scored once against a running service (--url) or a local store "
        "(--store), then moved to FOLDER/done/ or FOLDER/failed/ (image rejected) with a JSON sidecar "
        "(<name>.json). A ledger in FOLDER/.clipshot keeps restarts from inspecting a file twice. An "
        "unreachable service leaves files in place and retries. Stop with Ctrl-C.",
    )
    parser.add_argument("folder", type=Path, help="folder the cameras write into (not searched recursively)")
    parser.add_argument("--category", required=True, help="product to score against")
    add_source_arguments(parser)
    line = parser.add_argument_group("line")
    line.add_argument("--line", help="line name sent with every verdict (default: the service's CLIPSHOT_MQTT_LINE)")
    line.add_argument("--camera", help="camera name sent with every verdict")
    line.add_argument("--mqtt", action="store_true",
                      help="publish every verdict to the broker the CLIPSHOT_MQTT_* variables name (outbox in "
                      "FOLDER/.clipshot); leave off when the service publishes")
    parser.add_argument("--settle-s", type=float, default=0.5,
                        help="seconds a file must stay unchanged (after its writer closed it) before it is read "
                        "(default 0.5)")
    parser.add_argument("--stale-s", type=float, default=60.0,
                        help="a file still open for writing is read anyway after this many seconds unchanged "
                        "(default 60)")
    parser.add_argument("--once", action="store_true",
                        help="inspect what is in the folder (once complete) and exit instead of watching")
    parser.add_argument("--max-files", type=int, metavar="N",
                        help="exit after N files were inspected (a shift's batch, a test or a benchmark)")
    parser.set_defaults(func=run_watch)
    return parser


def service_inspector(client: Any, category: str, line: str | None, camera: str | None,
                      publish: Any = None) -> Any:
    """The hot folder's ``inspect``: one predict request per file; ``publish(answer, part_id)`` if given."""
    from app.cli.hot_folder import ImageRejected, TryLater
    from app.cli.predict import IMAGE_ERRORS
    from app.client import ClipshotError

    def inspect(path: Path, data: bytes) -> dict[str, Any]:
        try:
            answer = client.predict(category, [path], heatmap="regions", part_id=path.stem, line=line,
                                    camera=camera)
        except ClipshotError as exc:
            if exc.status in IMAGE_ERRORS:
                raise ImageRejected(exc.message) from exc
            if exc.status in OUTAGE_STATUSES:
                raise TryLater(exc.message) from exc
            raise CliError(exc.message + f" (HTTP {exc.status})") from exc  # wrong key, unknown product: stop
        if publish is not None:
            publish(answer, path.stem)
        pred = answer.predictions[0]
        verdict = "unknown" if pred.is_anomalous is None else "anomalous" if pred.is_anomalous else "normal"
        return {"verdict": verdict, **pred.model_dump(exclude={"heatmap", "timings", "filename", "batch_size"}),
                "part_id": path.stem, "line": line, "camera": camera, "replica": answer.replica}

    return inspect


def _publisher(args: argparse.Namespace) -> tuple[Any, Any]:
    """The running MQTT publisher and a ``publish(answer, part_id)`` for it, or (None, None) without --mqtt."""
    if not args.mqtt:
        return None, None
    from pydantic import ValidationError

    from app.cli.hot_folder import STATE_DIR
    from app.core.config import Settings
    from app.core.env import settings_error_line
    from app.serving.result_publisher import LineContext, PublisherConfigError, ResultPublisher, result_messages

    try:
        settings = Settings()
    except ValidationError as exc:
        raise CliError(settings_error_line(exc)) from None
    if not settings.mqtt_host:
        raise CliError("--mqtt needs the broker: set CLIPSHOT_MQTT_HOST (and the other CLIPSHOT_MQTT_* settings)")
    publisher = ResultPublisher(settings, outbox_dir=args.folder / STATE_DIR,
                                outbox_fix=f"FOLDER {args.folder} must be writable (the outbox goes in {STATE_DIR}/)")
    try:
        publisher.start()
    except PublisherConfigError as exc:
        raise CliError(str(exc)) from None

    def publish(answer: Any, part_id: str) -> None:
        context = LineContext(part_id=part_id, line=args.line, camera=args.camera)
        publisher.submit(result_messages(settings, answer, context, None))

    return publisher, publish


def run_watch(args: argparse.Namespace) -> int:
    """Check the folder, the service and the broker, then inspect files until Ctrl-C (or, with --once, done)."""
    from app.cli.hot_folder import HotFolder
    from app.cli.predict import _client
    from app.client import ClipshotError

    if args.url and args.store:
        raise CliError("give --url (a running service) or --store (local), not both")
    if not args.folder.is_dir():
        raise CliError(f"{args.folder} is not a directory")
    if args.settle_s < 0 or args.stale_s < args.settle_s:
        raise CliError("--settle-s must be >= 0 and --stale-s at least --settle-s")
    if args.max_files is not None and args.max_files < 1:
        raise CliError("--max-files must be at least 1")
    if args.store and not args.store.is_dir():
        raise CliError(f"--store {args.store} is not a directory")
    try:
        hot = HotFolder(args.folder, lambda p, d: {}, settle_s=args.settle_s, stale_s=args.stale_s)
    except OSError as exc:
        raise CliError(f"FOLDER {args.folder} must be writable (done/, failed/ and .clipshot/ go in it): "
                       f"{exc.strerror or exc}") from None
    publisher, publish = _publisher(args)
    try:
        with _client(args) as client:
            client.category(args.category)  # unknown product or wrong key: say so now, not per file
            hot.inspect = service_inspector(client, args.category, args.line, args.camera, publish)
            hot.start()
            print(f"clipshot watch: watching {hot.folder} for {args.category}", file=sys.stderr)
            while True:
                hot.run_once()
                if (args.once and not hot.pending()) or (args.max_files and hot.processed >= args.max_files):
                    break
                time.sleep(POLL_S)
    except ClipshotError as exc:
        raise CliError(exc.message + (f" (HTTP {exc.status})" if exc.status else "")) from None
    finally:
        hot.stop()
        if publisher is not None:
            publisher.stop()
    print(f"clipshot watch: {hot.processed} files inspected", file=sys.stderr)
    return 0
