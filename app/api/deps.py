"""FastAPI dependencies: the app's settings/services and bearer-key authentication.

Two scopes exist. **admin** keys manage products and jobs; **client** keys (production lines) may
only predict. Admin keys are accepted wherever a client key is (admin is a superset), so an engineer
can try a prediction with the key they already hold; a client key on an admin endpoint gets 403.

Keys are compared with ``hmac.compare_digest`` on SHA-256 digests of both sides, against *every*
configured key of *both* scopes, with no early exit: response time reveals neither which key
matched nor how long the keys are. Missing/malformed credentials -> 401 with
``WWW-Authenticate: Bearer``; an unknown key -> 401 ``invalid_token``. When both key lists are empty
and ``insecure_dev`` is set, every request is allowed (the service refuses to start otherwise, and if
it somehow did, these dependencies still fail closed).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import Depends, Request, Response
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.core.config import Settings
from app.errors import ClipshotHTTPError, ForbiddenError, UnauthorizedError
from app.jobs.job_store import JobStore
from app.metrics import Metrics
from app.serving.adapter_cache import AdapterCache
from app.serving.inference import InferenceService
from app.serving.pixel_budget import PixelBudget
from app.serving.readiness import ReadinessProbe

Scope = Literal["admin", "client"]

# auto_error=False: we raise our own 401 so the body has the service-wide error shape.
_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="BearerKey",
    description="`Authorization: Bearer <key>`: an admin key (everything) or a client key (predict only).",
)


@dataclass(frozen=True)
class Principal:
    """Who is calling: the granted scope, a non-secret key fingerprint for logs, and the key's name for audit."""

    scope: Scope
    key_id: str  # first 12 hex chars of sha256(key); "insecure-dev" when auth is disabled
    authenticated: bool = True
    name: str = "insecure-dev"  # the key's configured name (or one derived from its fingerprint)


def get_settings(request: Request) -> Settings:
    """The Settings the app was built with (``app.state.settings``), never a process-global copy."""
    return request.app.state.settings


def get_metrics(request: Request) -> Metrics:
    """The app's ``Metrics`` (``app.state.metrics``)."""
    return request.app.state.metrics


def get_job_store(request: Request) -> JobStore:
    """The app's ``JobStore`` (``app.state.job_store``)."""
    return request.app.state.job_store


def get_inference(request: Request) -> InferenceService:
    """The app's prediction pipeline (``app.state.inference``)."""
    return request.app.state.inference


def get_adapter_cache(request: Request) -> AdapterCache:
    """The app's ``AdapterCache`` (``app.state.adapter_cache``); invalidate it after deleting a category."""
    return request.app.state.adapter_cache


def get_pixel_budget(request: Request) -> PixelBudget:
    """The process-wide decoded-pixel budget (predict, registration and feedback share it)."""
    return request.app.state.inference.pixel_budget


def get_readiness(request: Request) -> ReadinessProbe:
    """The app's readiness probe (``app.state.readiness``)."""
    return request.app.state.readiness


SettingsDep = Annotated[Settings, Depends(get_settings)]
CredentialsDep = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def _matches_any(token_digest: bytes, keys: Sequence[str]) -> bool:
    """Constant-time membership: every key is compared, results OR-ed without branching on them."""
    found = 0
    for key in keys:
        found |= hmac.compare_digest(token_digest, _digest(key))
    return bool(found)


def authenticate(settings: Settings, credentials: HTTPAuthorizationCredentials | None) -> Principal:
    """Resolve credentials to the broadest scope they grant, or raise 401."""
    if not settings.auth_enabled:
        if settings.insecure_dev:
            return Principal(scope="admin", key_id="insecure-dev", authenticated=False)
        raise UnauthorizedError(
            "Authentication is not configured on this server.", bearer_error="invalid_token"
        )
    if credentials is None or not credentials.credentials.strip():
        raise UnauthorizedError("Missing or malformed credentials: send `Authorization: Bearer <key>`.")
    token = _digest(credentials.credentials.strip())
    is_admin = _matches_any(token, settings.admin_keys)
    is_client = _matches_any(token, settings.client_keys)  # always evaluated: no early exit
    if not (is_admin or is_client):
        raise UnauthorizedError("Invalid API key.", code="invalid_key", bearer_error="invalid_token")
    scope: Scope = "admin" if is_admin else "client"
    return Principal(scope=scope, key_id=token.hex()[:12], name=settings.key_name(scope, token.hex()))


def require_client(settings: SettingsDep, credentials: CredentialsDep) -> Principal:
    """Allow prediction: any client key, or an admin key."""
    return authenticate(settings, credentials)


def require_admin(settings: SettingsDep, credentials: CredentialsDep) -> Principal:
    """Allow product/job management: admin keys only (a client key gets 403)."""
    principal = authenticate(settings, credentials)
    if principal.scope != "admin":
        raise ForbiddenError(
            "This endpoint needs an admin key; the key given is a client (predict-only) key."
        )
    return principal


def require_metrics_access(settings: SettingsDep, credentials: CredentialsDep) -> Principal | None:
    """Guard ``/metrics`` only when ``metrics_require_key`` is set; then any valid key will do."""
    if not settings.metrics_require_key:
        return None
    return authenticate(settings, credentials)


AdminDep = Annotated[Principal, Depends(require_admin)]
ClientDep = Annotated[Principal, Depends(require_client)]
MetricsAccessDep = Annotated[Principal | None, Depends(require_metrics_access)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
JobStoreDep = Annotated[JobStore, Depends(get_job_store)]
InferenceDep = Annotated[InferenceService, Depends(get_inference)]
AdapterCacheDep = Annotated[AdapterCache, Depends(get_adapter_cache)]
ReadinessDep = Annotated[ReadinessProbe, Depends(get_readiness)]
PixelBudgetDep = Annotated[PixelBudget, Depends(get_pixel_budget)]


RouteGuard = Literal["admin", "client", "metrics"]


def _required_scope(dependant: Dependant) -> RouteGuard | None:
    """The key a route's dependency tree demands (admin wins), found once when the route is built.

    ``metrics`` is the scrape endpoint's guard: a key only when ``metrics_require_key`` is set."""
    calls = set()
    stack = [dependant]
    while stack:
        node = stack.pop()
        calls.add(node.call)
        stack.extend(node.dependencies)
    guards: tuple[tuple[Callable[..., Any], RouteGuard], ...] = (
        (require_admin, "admin"), (require_client, "client"), (require_metrics_access, "metrics"))
    for call, scope in guards:
        if call in calls:
            return scope
    return None


class AuthFirstRoute(APIRoute):
    """Checks the bearer key and scope from the headers *before* FastAPI reads (and spools) the body.

    FastAPI parses a form body before it solves dependencies, so without this an anonymous 200 MiB
    upload was read to a temp file only to get its 401, and a malformed body without a key got 422.
    The route's own ``AdminDep``/``ClientDep`` still runs afterwards (cheap) and documents the scheme.
    A refusal with a body still on the wire closes the connection, so the client stops sending it.
    ``required_scope`` is what the route demands (None: a public route); every router uses this class, and
    tests/test_app_route_guards.py fails on any route that is neither guarded nor on its public allow-list.
    """

    required_scope: RouteGuard | None = None

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        scope = self.required_scope = _required_scope(self.dependant)
        if scope is None:
            return handler

        async def auth_first(request: Request) -> Response:
            settings: Settings = request.app.state.settings
            if scope == "metrics" and not settings.metrics_require_key:
                return await handler(request)
            try:
                principal = authenticate(settings, await _bearer(request))
                if scope == "admin" and principal.scope != "admin":
                    require_admin(settings, await _bearer(request))  # raises the 403
            except ClipshotHTTPError as exc:
                if "content-length" in request.headers or "transfer-encoding" in request.headers:
                    exc.headers["Connection"] = "close"
                raise
            return await handler(request)

        return auth_first
