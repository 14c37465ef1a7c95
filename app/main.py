"""Application factory: ``create_app(settings)`` wires one backbone, one device thread and the services.

Everything heavy happens in the lifespan (not at import), so ``create_app`` is cheap, tests can build
several apps side by side, and a startup failure (no weights, no keys) stops the server before it
accepts traffic, with a message that says what to change.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool

from app.api.limits import BodySizeLimitMiddleware
from app.api.openapi import document_upload_limits
from app.api.request_id import RequestIdMiddleware
from app.api.routes import all_routers
from app.api.ui import install_ui
from app.categories.service import CategoryService
from app.core.config import Settings, env_var
from app.errors import install_error_handlers
from app.jobs.job_runner import JobRunner
from app.jobs.job_store import JobDatabaseError, JobStore
from app.jobs.refit_jobs import RefitJobs
from app.metrics import Metrics, RequestMetricsMiddleware
from app.records.service import RecordService
from app.serving.adapter_cache import AdapterCache
from app.serving.batcher import Batcher
from app.serving.device_worker import DeviceWorker
from app.serving.inference import InferenceService
from app.serving.int8_graphs import int8_preparer
from app.serving.mqtt_trigger import TriggerListener, start_trigger
from app.serving.opcua_security import OpcUaConfigError, load_security
from app.serving.opcua_server import OpcUaResults, start_opcua
from app.serving.readiness import ReadinessProbe
from app.serving.result_publisher import PublisherConfigError, ResultPublisher, start_result_publisher
from clipshot.backbone import EFFICIENTNET_LITE0, Backbone, BackboneLoadError, BackboneSpecError, load_backbone
from clipshot.detector import Detector
from clipshot.runtimes import FeatureRuntime, RuntimeUnavailable
from model_store import AdapterStore

log = logging.getLogger(__name__)
API_VERSION = "0.1.0"
SHUTDOWN_WAIT_S = 30.0


class StartupError(RuntimeError):
    """The service cannot start; the message is meant for the operator, without a traceback."""


def load_service_backbone(settings: Settings) -> Backbone:
    """Load the configured backbone, turning every known failure into advice on what to set instead."""
    try:
        return load_backbone(settings.backbone, device=settings.device, precision=settings.precision,
                             image_size=settings.image_size)
    except (BackboneLoadError, BackboneSpecError, RuntimeError, ValueError) as exc:
        raise StartupError(
            f"Cannot load backbone {settings.backbone!r}: {exc}\n"
            f"Fix: set {env_var('backbone')}=open_clip:<arch>:/path/to/open_clip_model.safetensors to use a "
            f"local CLIP checkpoint file, timm:<vit arch>:/path/to/model.safetensors for a DINOv2/DINOv3 file (memory "
            f"branch only), or {env_var('backbone')}={EFFICIENTNET_LITE0} (bundled, works "
            "offline, memory branch only: few-shot categories, no zero-shot or fine-tuning)."
        ) from exc


def feature_runtime(settings: Settings, backbone: Backbone) -> FeatureRuntime | None:
    """The configured feature runtime (None = PyTorch), refused at start-up if it cannot serve this backbone."""
    if settings.runtime == "torch":
        return None
    quantize = None if settings.runtime_quantize == "none" else settings.runtime_quantize
    if quantize is not None:
        log.warning("%s=%s: int8 features fail the accuracy gate (F1 at threshold -2.7 points on one shared dataset "
                    "at 16 shots, docs/results/int8); check your product with `clipshot eval` before relying on its "
                    "verdicts", env_var("runtime_quantize"), quantize)
    runtime = FeatureRuntime(settings.runtime, settings.runtime_cache_dir, quantize=quantize)
    try:
        runtime.check_backbone(backbone)
    except (RuntimeUnavailable, ValueError) as exc:
        raise StartupError(f"{env_var('runtime')}={settings.runtime}: {exc}") from exc
    return runtime


def open_job_store(settings: Settings) -> JobStore:
    """The job records' database (SQLite in the store, or ``job_db``); failure = one line saying what to fix."""
    try:
        return JobStore(settings.store, url=settings.job_db)
    except JobDatabaseError as exc:
        fix = (f"start PostgreSQL there or correct {env_var('job_db')} (empty = SQLite in the store)"
               if settings.job_db else f"make {env_var('store')} a writable directory")
        raise StartupError(f"{exc} Fix: {fix}.") from exc


def open_records(settings: Settings, metrics: Metrics) -> RecordService:
    """The inspection record and audit log (same database server as the jobs); failure = one line to fix."""
    try:
        return RecordService(settings, metrics)
    except JobDatabaseError as exc:
        fix = (f"start PostgreSQL there or correct {env_var('job_db')} (empty = SQLite in the store)"
               if settings.job_db else f"make {env_var('store')} a writable directory")
        raise StartupError(f"{exc} Fix: {fix}.") from exc


def start_mqtt(settings: Settings, metrics: Metrics | None = None, send: bool = True) -> ResultPublisher | None:
    """The result publisher (None without ``mqtt_host``); a broker or TLS problem = one line naming the setting.
    ``send=False`` connects and claims the outbox only: a start-up check that sends nothing."""
    try:
        return start_result_publisher(settings, metrics, send=send)
    except PublisherConfigError as exc:
        raise StartupError(str(exc)) from exc


def _start_trigger(state: object, publisher: ResultPublisher, loop: asyncio.AbstractEventLoop) -> TriggerListener:
    try:
        return start_trigger(state, publisher, loop)
    except PublisherConfigError as exc:
        raise StartupError(str(exc)) from exc


def check_line_inputs(settings: Settings) -> None:
    """The folders line messages may read images from, and the OPC UA security files: one line if one is bad."""
    for name in ("opcua_image_root", "mqtt_trigger_image_root"):
        root = getattr(settings, name)
        if root is not None and not root.is_dir():
            raise StartupError(f"{root} is not a folder; check {env_var(name)}")
    if settings.opcua_endpoint:
        check_opcua(settings)


def check_opcua(settings: Settings) -> None:
    """Read the OPC UA certificate, key, trust folder and users now: a bad file = one line naming the setting."""
    try:
        load_security(settings)
    except OpcUaConfigError as exc:
        raise StartupError(str(exc)) from exc


async def _start_opcua(settings: Settings, state: object) -> OpcUaResults:
    try:
        return await start_opcua(settings, state)
    except OpcUaConfigError as exc:
        raise StartupError(str(exc)) from exc


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Build services in dependency order; the exit stack tears down in reverse (job runner before device)."""
    state = app.state
    settings: Settings = state.settings
    metrics: Metrics = state.metrics
    settings.validate_security()
    backbone = state.preloaded_backbone or await run_in_threadpool(load_service_backbone, settings)
    state.preloaded_backbone = None  # the app owns it now; a second lifespan run reloads
    log.info("backbone %s on %s at %s (image size %d), features through %s", backbone.spec, backbone.device,
             backbone.precision, backbone.image_size, settings.runtime)
    if backbone.device.type == "cuda":
        metrics.device_memory.cuda_device = backbone.device
    metrics.set_build_info(backbone=backbone.spec, device=str(backbone.device))
    async with contextlib.AsyncExitStack() as stack:
        state.result_publisher = publisher = await run_in_threadpool(start_mqtt, settings, metrics)
        state.result_sinks = [publisher] if publisher is not None else []  # line outputs (app/api/line_results.py)
        if publisher is not None:
            stack.push_async_callback(run_in_threadpool, publisher.stop)
        merge = settings.lora_merge == "on" or (settings.lora_merge == "auto" and backbone.device.type == "cuda")
        state.detector = detector = Detector(backbone, merge_lora=merge, mixed_lora=settings.mixed_lora,
                                             runtime=feature_runtime(settings, backbone),
                                             memory_precision=settings.memory_precision)
        state.store = store = AdapterStore(settings.store)
        if swept := await run_in_threadpool(store.sweep_abandoned):
            log.info("removed %d leftover temp/trash entries of interrupted store writes", swept)
        state.job_store = job_store = open_job_store(settings)
        stack.callback(job_store.close)
        state.records = records = await run_in_threadpool(open_records, settings, metrics)
        stack.push_async_callback(run_in_threadpool, records.close)  # after the batcher: the last answers too
        state.device_worker = worker = DeviceWorker(metrics)
        worker.start()
        stack.push_async_callback(run_in_threadpool, worker.stop)
        state.adapter_cache = cache = AdapterCache(store, detector, metrics, worker,
                                                   device_capacity=settings.adapter_cache_device,
                                                   cpu_capacity=settings.adapter_cache_cpu,
                                                   device_bytes=settings.adapter_cache_device_bytes,
                                                   cpu_bytes=settings.adapter_cache_cpu_bytes,
                                                   prepare=int8_preparer(settings, store, detector, worker))
        stack.push_async_callback(_release_adapters, worker, cache)
        state.batcher = batcher = Batcher(detector, worker, cache, metrics, max_batch_size=settings.max_batch_size,
                                          max_wait_ms=settings.max_batch_wait_ms,
                                          timeout_s=settings.predict_timeout_s)
        await batcher.start()
        stack.push_async_callback(batcher.stop)
        state.inference = InferenceService(settings, detector, cache, batcher, metrics)
        if settings.opcua_endpoint:  # after inference: its InspectImage method scores images
            state.opcua = await _start_opcua(settings, state)
            stack.push_async_callback(state.opcua.stop)
            state.result_sinks.append(state.opcua)
        if publisher is not None and settings.mqtt_trigger_topic:  # after inference: triggers run inspections
            state.mqtt_trigger = await run_in_threadpool(_start_trigger, state, publisher, asyncio.get_running_loop())
            stack.push_async_callback(state.mqtt_trigger.stop)  # runs before the publisher and batcher stop
        state.readiness = ReadinessProbe(
            backbone, worker, broken=lambda: None if batcher.failure is None else f"batcher stopped: {batcher.failure}")
        _start_jobs_and_registry(app, stack)
        yield


async def _release_adapters(worker: DeviceWorker, cache: AdapterCache) -> None:
    """Detach LoRAs on the device thread before it stops (best effort: shutdown must not hang)."""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(worker.run(cache.clear), SHUTDOWN_WAIT_S)


def _start_jobs_and_registry(app: FastAPI, stack: contextlib.AsyncExitStack) -> None:
    """Fine-tune job runner and category registration; the runner stops before the device worker."""
    s = app.state
    runner = JobRunner(settings=s.settings, store=s.store, job_store=s.job_store, detector=s.detector,
                       device_worker=s.device_worker, adapter_cache=s.adapter_cache, metrics=s.metrics)
    runner.start()
    stack.push_async_callback(run_in_threadpool, runner.stop)
    s.job_runner = runner
    s.refit_jobs = refits = RefitJobs(s.job_store, stale_s=s.settings.job_stale_s)
    stack.push_async_callback(refits.stop)  # before the runner and the device worker stop
    s.categories = s.category_service = CategoryService(
        settings=s.settings, store=s.store, detector=s.detector, device_worker=s.device_worker,
        adapter_cache=s.adapter_cache, job_runner=runner)
    swept = s.category_service.sweep_orphans()  # shot files of fits that died before saving their version
    if swept:
        log.warning("removed shot files no version lists (left by a crash): %s",
                    {name: len(files) for name, files in swept.items()})


def operation_id(route: APIRoute) -> str:
    """OpenAPI operationId = the handler's name (``predict_category``), so generated clients read well."""
    return route.name


def create_app(settings: Settings | None = None, *, backbone: Backbone | None = None) -> FastAPI:
    """Build the ASGI app; ``backbone`` lets the CLI load (and report failures) before the server starts."""
    settings = settings or Settings()
    metrics = Metrics()
    app = FastAPI(
        title="clipshot",
        version=API_VERSION,
        summary="Few-shot industrial anomaly detection on one frozen CLIP with per-product adapters.",
        lifespan=lifespan,
        docs_url=None,  # served offline by install_ui, with /redoc and /console
        redoc_url=None,
        openapi_url="/openapi.json",
        generate_unique_id_function=operation_id,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.preloaded_backbone = backbone
    install_error_handlers(app)
    document_upload_limits(app, settings)
    for router in all_routers():
        app.include_router(router)
    install_ui(app)
    # Last added = outermost: metrics see every response, including early 413s; every response gets an id.
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_request_bytes)
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)
    app.add_middleware(RequestIdMiddleware)
    return app


__all__ = ["StartupError", "check_line_inputs", "check_opcua", "create_app", "feature_runtime", "lifespan",
           "load_service_backbone", "open_job_store", "start_mqtt"]
