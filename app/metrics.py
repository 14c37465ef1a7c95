"""Prometheus metrics, one ``Metrics`` object (with its own ``CollectorRegistry``) per app.

A dedicated registry instead of prometheus_client's global one lets tests build several apps in
one process without "Duplicated timeseries" errors, and keeps ``/metrics`` limited to what we
document. ``docs/reference/metrics.md`` is generated from the specs recorded here
(``python -m app.metrics > docs/reference/metrics.md``); a test fails if it drifts.

Label values are bounded on purpose: ``route`` is the route *template* (``/v1/predict/{category}``),
never the raw path, and unmatched paths are lumped into ``"unmatched"``.
"""

from __future__ import annotations

import platform
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

STAGES = ("decode", "preprocess", "postprocess")  # per image; the forward pass is per batch (its own family)
FORWARD = "forward"
TIERS = ("device", "cpu")
VERDICTS = ("normal", "anomalous", "unknown")  # unknown: no calibrated threshold yet
QUEUES = ("predict", "train", "admitted")  # every value the services use (tested against a live scrape)
RECORD_DROP_REASONS = ("queue_full", "write_failed")  # why an inspection never reached the record
# score / threshold: fine around 1 (the decision boundary), coarse far from it.
RATIO_BUCKETS = (0.25, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0, 1.05, 1.1, 1.25, 1.5, 2.0, 4.0)
BATCH_CATEGORY = "*"  # category label for per-batch work shared by several categories
DEVICE_MEMORY = "clipshot_device_memory_bytes"
_DEVICE_MEMORY_HELP = (
    "Accelerator memory in use: kind=allocated/reserved from torch.cuda (the serving GPU, only once CUDA is "
    "initialised; absent on CPU). Host memory is process_resident_memory_bytes."
)
# prometheus_client's ProcessCollector (Linux /proc): documented here because the registry is ours.
PROCESS_METRICS = (
    ("process_resident_memory_bytes", "gauge", "Resident set size of the server process (host RAM)."),
    ("process_virtual_memory_bytes", "gauge", "Virtual memory size of the server process."),
    ("process_cpu_seconds_total", "counter", "User + system CPU time of the server process."),
    ("process_open_fds", "gauge", "Open file descriptors."),
    ("process_max_fds", "gauge", "File descriptor limit."),
    ("process_start_time_seconds", "gauge", "Start time of the process (Unix seconds)."),
)


@dataclass(frozen=True)
class MetricSpec:
    """What the docs say about one family: exposition name, type, labels, meaning."""

    name: str
    type: str
    labels: tuple[str, ...]
    help: str


class DeviceMemoryCollector(Collector):
    """Reads memory at scrape time, so the gauge is never stale and costs nothing between scrapes."""

    def __init__(self) -> None:
        self.cuda_device: Any = None  # the serving device once the backbone is loaded (None: torch's current)

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return [GaugeMetricFamily(DEVICE_MEMORY, _DEVICE_MEMORY_HELP, labels=["kind"])]

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily(DEVICE_MEMORY, _DEVICE_MEMORY_HELP, labels=["kind"])
        # Only look at torch if something already imported it: importing it here would cost seconds,
        # and touching torch.cuda before the model does would create a CUDA context on the wrong device.
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            family.add_metric(["allocated"], float(torch.cuda.memory_allocated(self.cuda_device)))
            family.add_metric(["reserved"], float(torch.cuda.memory_reserved(self.cuda_device)))
        return [family]


def _versions() -> dict[str, str]:
    """Versions for the build-info metric, from package metadata (importing torch here would cost seconds)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for label, dist in (("version", "clipshot"), ("torch", "torch"), ("open_clip", "open_clip_torch")):
        try:
            found[label] = version(dist)
        except PackageNotFoundError:
            found[label] = "unknown"
    return found


class Metrics:
    """All clipshot metric families, registered on ``self.registry``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.specs: list[MetricSpec] = []
        self.http_request_duration = self._histogram(
            "clipshot_http_request_duration_seconds",
            "Time from request start to the end of the response, by route template, method and status code.",
            ("route", "method", "status"),
            (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.inference_stage = self._histogram(
            "clipshot_inference_stage_seconds",
            "CPU time per image and stage (decode, preprocess, postprocess), per category: one observation per "
            "image (a request's preprocessing is shared out over its images). The device forward is per batch: "
            "clipshot_batch_forward_seconds.",
            ("stage", "category"),
            (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )
        self.batch_forward = self._histogram(
            "clipshot_batch_forward_seconds",
            "Backbone forward + scoring of one batch on the device (adapter switch included), one observation "
            "per batch; category=`*` for a batch shared by several categories. Buckets reach 30 s for ViT-B on CPU "
            "and large batches.",
            ("category",),
            (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.batch_size = self._histogram(
            "clipshot_batch_size",
            "Images per backbone forward pass formed by the dynamic batcher.",
            (),
            (1, 2, 4, 8, 16, 32, 64, 128),
        )
        self.adapter_cache_hits = self._counter(
            "clipshot_adapter_cache_hits_total",
            "Adapter lookups served from a cache tier (device = on the accelerator, cpu = host memory).",
            ("tier",),
        )
        self.adapter_cache_misses = self._counter(
            "clipshot_adapter_cache_misses_total",
            "Adapter lookups not found in a tier (a cpu-tier miss means a load from the store).",
            ("tier",),
        )
        self.adapter_cache_evictions = self._counter(
            "clipshot_adapter_cache_evictions_total",
            "Adapters evicted from a tier because it was full (LRU).",
            ("tier",),
        )
        self.adapter_load = self._histogram(
            "clipshot_adapter_load_seconds",
            "Time to load an adapter from the store on disk and move it to the device.",
            (),
            (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )
        self.adapters_resident = self._gauge(
            "clipshot_adapters_resident", "Adapters currently held in each cache tier.", ("tier",)
        )
        self.adapter_cache_bytes = self._gauge(
            "clipshot_adapter_cache_bytes",
            "Bytes of the adapters held in each cache tier (their memory banks, text embeddings and LoRA tensors).",
            ("tier",),
        )
        self.jobs = self._gauge("clipshot_jobs", "Jobs in the job store, by state.", ("state",))
        self.job_duration = self._histogram(
            "clipshot_job_duration_seconds",
            "Wall-clock run time of finished background jobs, by final state.",
            ("state",),
            (10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200),
        )
        self.queue_depth = self._gauge(
            "clipshot_queue_depth",
            "Items waiting: predict = images queued for the batcher, train = jobs queued for a worker, "
            "admitted = images in predict requests not answered yet (new ones get 503 above max_pending_images).",
            ("queue",),
        )
        self.predictions = self._counter(
            "clipshot_predictions_total",
            "Images scored, by category and verdict (normal, anomalous, or unknown when uncalibrated).",
            ("category", "verdict"),
        )
        self.score_ratio = self._histogram(
            "clipshot_score_threshold_ratio",
            "Image score divided by the category's threshold at the time (above 1 = anomalous), per category. "
            "Buckets are relative to the threshold, so a product drifting towards it shows as mass moving into "
            "the 0.8-1 buckets before verdicts change, whatever its absolute score range. Only calibrated "
            "adapters with a positive threshold are observed.",
            ("category",),
            RATIO_BUCKETS,
        )
        self.mismatched_images = self._counter(
            "clipshot_mismatched_images_total",
            "Uploads unlike the category's shots (far smaller, another colour mode or aspect ratio), per category: "
            "scored with a `warnings` entry, or refused with 400 when CLIPSHOT_REFUSE_MISMATCHED_IMAGES is on. A "
            "rising share usually means a camera or its settings changed.",
            ("category",),
        )
        self.mqtt_published = self._counter(
            "clipshot_mqtt_published_total",
            "Results the MQTT broker acknowledged (QoS 1 PUBACK); only with CLIPSHOT_MQTT_HOST set.",
            (),
        )
        self.mqtt_outbox_depth = self._gauge(
            "clipshot_mqtt_outbox_depth",
            "Results waiting in the MQTT outbox for the broker's acknowledgement (grows while the broker is away).",
            (),
        )
        self.mqtt_outbox_dropped = self._counter(
            "clipshot_mqtt_outbox_dropped_total",
            "Results dropped unsent, oldest first, because the MQTT outbox held CLIPSHOT_MQTT_OUTBOX_MAX already.",
            (),
        )
        self.records_dropped = self._counter(
            "clipshot_records_dropped_total",
            "Inspections left out of the record (CLIPSHOT_RECORD_MODE): `queue_full` when "
            "CLIPSHOT_RECORD_QUEUE_SIZE were already waiting for the writer, `write_failed` when the database or "
            "the image folder refused them. The predictions themselves were answered.",
            ("reason",),
        )
        for reason in RECORD_DROP_REASONS:  # exported at 0 from the start, so rate() and alerts see the series
            self.records_dropped.labels(reason=reason)
        self.device_memory = DeviceMemoryCollector()
        self.registry.register(self.device_memory)
        self.specs.append(MetricSpec(DEVICE_MEMORY, "gauge", ("kind",), _DEVICE_MEMORY_HELP))
        build_labels = ("version", "python", "torch", "open_clip", "backbone", "device")
        self.build_info = Info("clipshot_build", "Always 1; the labels name the running build and model: clipshot, "
                               "Python, torch and open_clip versions, backbone spec and device (set at startup).",
                               registry=self.registry)
        self.specs.append(MetricSpec("clipshot_build_info", "info", build_labels, self.build_info._documentation))
        self.set_build_info()
        ProcessCollector(registry=self.registry)
        self.specs += [MetricSpec(name, kind, (), doc) for name, kind, doc in PROCESS_METRICS]

    def set_build_info(self, backbone: str = "loading", device: str = "unknown") -> None:
        """Label the build-info series; the lifespan calls it again once the backbone is loaded."""
        self.build_info.info({**_versions(), "backbone": backbone, "device": device})

    def _histogram(
        self, name: str, doc: str, labels: tuple[str, ...], buckets: tuple[float, ...]
    ) -> Histogram:
        self.specs.append(MetricSpec(name, "histogram", labels, doc))
        return Histogram(name, doc, labels, registry=self.registry, buckets=buckets)

    def _counter(self, name: str, doc: str, labels: tuple[str, ...]) -> Counter:
        self.specs.append(MetricSpec(name, "counter", labels, doc))
        return Counter(name, doc, labels, registry=self.registry)

    def _gauge(self, name: str, doc: str, labels: tuple[str, ...]) -> Gauge:
        self.specs.append(MetricSpec(name, "gauge", labels, doc))
        return Gauge(name, doc, labels, registry=self.registry)

    @contextmanager
    def time_stage(self, stage: str, category: str, images: int = 1) -> Iterator[None]:
        """``with metrics.time_stage("decode", cat): ...``; unknown stages are a bug, not a new label.

        ``forward`` (per batch) goes to ``clipshot_batch_forward_seconds``; the other stages are per image, and
        work timed over ``images`` images at once is shared out as that many observations.
        """
        if stage != FORWARD and stage not in STAGES:
            raise ValueError(f"stage must be one of {(*STAGES, FORWARD)}, got {stage!r}")
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            if stage == FORWARD:
                self.batch_forward.labels(category).observe(elapsed)
            else:
                child = self.inference_stage.labels(stage, category)
                for _ in range(max(1, images)):
                    child.observe(elapsed / max(1, images))

    def observe_verdict(self, category: str, verdict: str, score: float, threshold: float | None) -> None:
        """Count the verdict and, when a threshold exists, where the score sits relative to it."""
        if verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {verdict!r}")
        self.predictions.labels(category, verdict).inc()
        if threshold is not None and threshold > 0:
            self.score_ratio.labels(category).observe(score / threshold)

    def set_job_counts(self, counts: Mapping[str, int]) -> None:
        """Set ``clipshot_jobs`` from ``JobStore.count_by_state()`` (missing states read as 0)."""
        for state in ("queued", "running", "succeeded", "failed", "cancelled"):
            self.jobs.labels(state).set(counts.get(state, 0))

    def render(self) -> tuple[bytes, str]:
        """Exposition body and its content type, for the ``/metrics`` endpoint."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def scrape(self, job_store: Any | None) -> tuple[bytes, str]:
        """``render`` after reading the job counts now, so the gauge is never stale (``/metrics``, Ray replicas)."""
        if job_store is not None:
            self.set_job_counts(job_store.count_by_state())
        return self.render()


class RequestMetricsMiddleware:
    """Pure-ASGI middleware observing ``clipshot_http_request_duration_seconds`` for every request."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # if the app raises before responding, the server answers 500

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            # The router stores the matched route in the (shared) scope; use its template, not the path.
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.http_request_duration.labels(route, scope["method"], str(status)).observe(
                time.perf_counter() - start
            )


def render_metrics_markdown(metrics: Metrics | None = None) -> str:
    """``docs/reference/metrics.md``: one row per family, generated from ``Metrics.specs``."""
    specs = (metrics or Metrics()).specs
    lines = [
        "# Metrics reference",
        "",
        "<!-- Generated by `python -m app.metrics > docs/reference/metrics.md`; do not edit by hand. -->",
        "",
        "`GET /metrics` serves these families in the Prometheus text format from a registry private to",
        "the app, plus prometheus_client's process collector (`process_*`, Linux). It needs a key only when",
        "`CLIPSHOT_METRICS_REQUIRE_KEY=true`. Histograms expose `_bucket`, `_sum` and `_count` series;",
        "counters and histograms also expose a `_created` timestamp series.",
        "",
        f"Label values: `stage` in {', '.join(f'`{s}`' for s in STAGES)}; `tier` in "
        f"{', '.join(f'`{t}`' for t in TIERS)}; `verdict` in {', '.join(f'`{v}`' for v in VERDICTS)}; "
        f"`queue` in {', '.join(f'`{q}`' for q in QUEUES)}; `state` is a job state; `route` is the route "
        "template (`unmatched` for 404s).",
        "",
        "| Name | Type | Labels | Meaning |",
        "|---|---|---|---|",
    ]
    for s in specs:
        labels = ", ".join(f"`{label}`" for label in s.labels) or "—"
        lines.append(f"| `{s.name}` | {s.type} | {labels} | {s.help} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render_metrics_markdown(), end="")
