"""The two Ray Serve deployments: ``Router`` (HTTP ingress, CPU) and ``DetectorReplica`` (GPU).

Why this split (the LoRAX / Ray Serve router-vs-model-server shape): every detector replica runs the
whole, unchanged clipshot FastAPI app (backbone, batcher, adapter LRU, job runner) and answers exactly
as ``clipshot serve`` does; the router only reads the request, resolves a prediction's category to its
active version from the shared store, and forwards it with the multiplexed model id
``category@version``. Ray Serve then prefers a replica that already holds that adapter (affinity), the
replica serves exactly that version (pinned in the ASGI scope, where no HTTP client can reach it), and an
activation is therefore seen by every replica on the next request: the router reads the pointer per
request. A replica that dies mid-request becomes a retryable 503 at the router, never a 500.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Any

from fastapi.security import HTTPAuthorizationCredentials
from fastapi.security.utils import get_authorization_scheme_param
from prometheus_client import CONTENT_TYPE_LATEST
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from app.api.deps import authenticate
from app.api.request_id import HEADER as REQUEST_ID_HEADER
from app.api.request_id import accepted_request_id
from app.api.routes.predict import PINNED_VERSION_SCOPE
from app.core.config import Settings
from app.core.identity import replica_name, set_replica_name
from app.distributed.asgi_call import HttpRequest, HttpResponse, call_asgi
from app.distributed.body_budget import BodyBudget
from app.distributed.metrics_merge import merge_expositions
from app.errors import ClipshotHTTPError, OverloadedError
from model_store import CATEGORY_NAME, AdapterStore

STORE_CHECK_DIR = ".ray-store-check"  # the launcher writes a token here; every replica must see it
RETRY_AFTER_S = 1  # a replacement replica is scheduled at once; the next try usually lands on a live one
_BODY_HEADERS = (b"content-length", b"transfer-encoding", b"content-type")  # dropped with an unread body
_PREDICT_PATH = re.compile(r"^/v1/categories/([^/]+)/predict/?$")
# Replica died or went away mid-request, or every replica is full: the caller should retry, not give up.
RETRYABLE = (RayActorError, BackPressureError, DeploymentUnavailableError)


class StoreNotShared(RuntimeError):
    """This node does not see the adapter store the launcher wrote to."""


def model_id(category: str, version: int) -> str:
    """The multiplexed model id Ray Serve routes on."""
    return f"{category}@{version}"


def parse_model_id(value: str) -> tuple[str, int] | None:
    """``category@version`` -> (category, version); None for anything else."""
    category, sep, version = value.rpartition("@")
    if not sep or not CATEGORY_NAME.fullmatch(category) or not version.isdigit():
        return None
    return category, int(version)


def check_store_token(store: Path, token: str) -> None:
    """Raise ``StoreNotShared`` unless the launcher's token is visible here (same folder on every node)."""
    if not (Path(store) / STORE_CHECK_DIR / token).is_file():
        raise StoreNotShared(
            f"the adapter store {store} on this node is not the folder `clipshot serve-ray` wrote to "
            f"(missing {STORE_CHECK_DIR}/{token}). Fix: mount one shared folder (NFS, EFS, a ReadWriteMany PVC) "
            "at the same CLIPSHOT_STORE path on every Ray node.")


class DetectorReplica:
    """One clipshot service (its FastAPI app and lifespan) inside a Ray Serve replica."""

    # Ray Serve awaits an async constructor; Python's data model (and mypy) only knows a sync __init__
    async def __init__(self, settings: dict[str, Any], store_token: str) -> None:  # type: ignore[misc]
        from app.main import create_app  # torch and the model code load in the replica, not in the router

        config = Settings(**settings)
        check_store_token(config.store, store_token)
        context = serve.get_replica_context()
        set_replica_name(f"{context.replica_id.unique_id}@{replica_name()}")
        self.app = create_app(config)
        self._lifespan = self.app.router.lifespan_context(self.app)
        await self._lifespan.__aenter__()  # loads the backbone, opens the job store, starts the workers
        cache = self.app.state.adapter_cache

        async def warm(adapter_id: str) -> str:
            """Ray's per-replica model LRU tracks which ids live here; our own AdapterCache holds them."""
            category, version = parse_model_id(adapter_id) or ("", 0)
            await run_in_threadpool(cache.get, category, version)
            return adapter_id

        # Ray's LRU is as large as this replica's adapter cache (device + host tiers): an adapter in either tier
        # is "held" (a host-to-device copy, not a load from the store), and a smaller LRU would make Ray evict
        # and re-route adapters this replica still has (16 products round-robin over 8 slots: every request).
        capacity = max(1, config.adapter_cache_device + config.adapter_cache_cpu)
        self._warm = serve.multiplexed(max_num_models_per_replica=capacity)(warm)

    async def handle(self, request: HttpRequest) -> HttpResponse:
        """Replay one HTTP request into the app, pinned to the version the router routed on."""
        extra: dict[str, Any] = {}
        if parsed := parse_model_id(serve.get_multiplexed_model_id() or ""):
            with contextlib.suppress(Exception):  # unknown/corrupt version: the app answers with its 4xx
                await self._warm(model_id(*parsed))
            extra[PINNED_VERSION_SCOPE] = parsed[1]
        return await call_asgi(self.app, request, extra)

    async def metrics_text(self) -> tuple[str, str]:
        """This replica's name and Prometheus exposition (job counts read now, as the route does)."""
        state = self.app.state
        body, _ = await run_in_threadpool(state.metrics.scrape, getattr(state, "job_store", None))
        return replica_name(), body.decode()

    async def check_health(self) -> None:
        """Ray replaces a replica whose device no longer answers (same probe as ``/readyz``)."""
        result = await self.app.state.readiness.check()
        if not result.ok:
            raise RuntimeError(result.detail or "device probe failed")

    async def __del__(self) -> None:
        """Graceful stop: the app's lifespan drains jobs and releases adapters, as on SIGTERM."""
        with contextlib.suppress(Exception):
            await self._lifespan.__aexit__(None, None, None)


class Router:
    """HTTP ingress: body reads bounded per request and in total (``BodyBudget``), ``category@version``
    resolution, forwarding, retryable failures."""

    def __init__(self, detector: DeploymentHandle, settings: dict[str, Any],
                 finetune: DeploymentHandle | None = None) -> None:
        self.settings = Settings(**settings)
        self.store = AdapterStore(self.settings.store)
        self.detector = detector
        self.finetune = finetune  # not routed to; part of the application, and of /metrics
        self.bodies = BodyBudget(self.settings.ray_router_body_bytes, self.settings.max_request_bytes)

    async def __call__(self, request: Request) -> Response:
        refused = self._unknown_key(request)
        try:
            async with self.bodies.hold(request, read=not refused) as body:  # held until the replica answers
                return await self._forward(request, body, refused)
        except ClipshotHTTPError as exc:  # over the body budget or the request limit, before the body is read
            return _error(request, exc)

    async def _forward(self, request: Request, body: bytes, refused: bool) -> Response:
        adapter_id = await run_in_threadpool(self._model_id, request.url.path) if request.method == "POST" else None
        handle = self.detector.options(multiplexed_model_id=adapter_id) if adapter_id else self.detector
        forwarded = HttpRequest(method=request.method, path=request.url.path,
                                query_string=request.scope.get("query_string", b""),
                                headers=[(k, v) for k, v in request.scope.get("headers", [])
                                         if not (refused and k.lower() in _BODY_HEADERS)], body=body,
                                client=(request.client.host, request.client.port) if request.client else None)
        try:
            answer: HttpResponse = await handle.handle.remote(forwarded)
        except RETRYABLE as exc:
            return _error(request, OverloadedError(
                f"the replica serving this request went away ({type(exc).__name__}); retry shortly",
                code="replica_unavailable", retry_after=RETRY_AFTER_S))
        if request.url.path == "/metrics" and request.method == "GET" and answer.status == 200:
            return await self._all_metrics(request)  # the replica that answered has checked the key
        response = Response(content=answer.body, status_code=answer.status)
        response.raw_headers = answer.headers
        return response

    async def _all_metrics(self, request: Request) -> Response:
        """Every replica's metrics (detectors and fine-tune workers) in one exposition, labelled by replica."""
        texts: dict[str, str] = {}
        try:
            for handle in filter(None, (self.detector, self.finetune)):
                texts.update(await handle.broadcast("metrics_text").results_async())
        except Exception as exc:  # a replica went away mid-scrape: the next scrape will see its replacement
            return _error(request, OverloadedError(f"could not collect every replica's metrics "
                                                   f"({type(exc).__name__}); retry", code="replica_unavailable",
                                                   retry_after=RETRY_AFTER_S))
        return Response(merge_expositions(texts), media_type=CONTENT_TYPE_LATEST)

    def _unknown_key(self, request: Request) -> bool:
        """An API request whose key no replica would accept: forwarded without its body (never read), so an
        anonymous 100 MiB upload costs its headers only, as under ``clipshot serve``; the replica answers
        the 401/403 itself, so the error is the app's own."""
        if not self.settings.auth_enabled or not request.url.path.startswith("/v1/"):
            return False
        scheme, key = get_authorization_scheme_param(request.headers.get("authorization"))
        credentials = HTTPAuthorizationCredentials(scheme=scheme, credentials=key) if scheme.lower() == "bearer" \
            else None
        try:
            authenticate(self.settings, credentials)  # the app's own, constant-time key check
        except ClipshotHTTPError:
            return True
        return False

    def _model_id(self, path: str) -> str | None:
        """``category@active_version`` for a category prediction; None routes like any other request."""
        match = _PREDICT_PATH.match(path)
        if not match or not CATEGORY_NAME.fullmatch(category := match.group(1)):
            return None
        try:
            version = self.store.active_version(category)
        except Exception:  # unreadable pointer: let a replica answer with the store's own error
            return None
        return None if version is None else model_id(category, version)


def _error(request: Request, error: ClipshotHTTPError) -> Response:
    """The app's error (shape, code, Retry-After), with the caller's request id when it sent a usable one."""
    request_id = accepted_request_id(request.headers.get(REQUEST_ID_HEADER))
    body = error.body()
    body["error"]["request_id"] = request_id
    return JSONResponse(body, status_code=error.status_code, headers={**error.headers, REQUEST_ID_HEADER: request_id})


__all__ = ["DetectorReplica", "Router", "StoreNotShared", "check_store_token", "model_id", "parse_model_id"]
