"""Check the configuration, then run clipshot as a Ray Serve application.

``build_application(settings)`` is the one place the deployments get their options (replicas, autoscaling
bounds, GPUs) from the settings; ``run`` is what ``clipshot serve-ray`` calls; ``app_builder`` is the
``import_path`` for ``serve run`` / ``serve deploy`` / a KubeRay ``RayService``, reading the same
``CLIPSHOT_*`` variables. Every misconfiguration a user can make here ends in one line saying what to fix,
before anything is deployed: Ray not installed, a Ray address that does not answer, several replicas with
the single-process SQLite job file, an unreachable PostgreSQL, a store the replicas do not share.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import time
import uuid
from pathlib import Path
from typing import Any

from app.core.config import Settings, env_var

log = logging.getLogger("clipshot.serve_ray")
APP_NAME = "clipshot"
ROUTER_CPUS = 0.25  # the router parses and forwards; it never touches a model
TOKEN_MAX_AGE_S = 7 * 24 * 3600
CONNECT_TIMEOUT_S = 5.0
CONSTRUCTOR_RETRIES = 2  # store-check tokens of older launches are swept


class RayConfigError(RuntimeError):
    """Configuration that cannot work on Ray; the message says what to change."""


def import_serve() -> Any:
    """``ray.serve``, or one line on how to install it (the extra is optional)."""
    try:
        from ray import serve
    except ImportError as exc:
        raise RayConfigError(f"Ray Serve is not installed ({exc}). Fix: pip install -e '.[ray]' "
                             "(or pip install 'ray[serve]').") from None
    return serve


def check_settings(settings: Settings) -> None:
    """Rules only the Ray layout has (replicas share the job records)."""
    several = settings.ray_max_replicas > 1 or settings.ray_finetune_workers > 0
    if several and not settings.job_db:
        raise RayConfigError(
            f"{settings.ray_max_replicas} detector replicas and {settings.ray_finetune_workers} fine-tune "
            "workers would share the single-process SQLite job file. Fix: set "
            f"{env_var('job_db')}=postgresql://user:password@host:5432/db (or run one replica).")


def write_store_token(store: Path) -> str:
    """A fresh token file in the store, which every replica must see (the shared-store check)."""
    from app.distributed.deployments import STORE_CHECK_DIR
    from model_store.atomic import replace_file

    folder = Path(store) / STORE_CHECK_DIR
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.iterdir():
            if time.time() - old.stat().st_mtime > TOKEN_MAX_AGE_S:
                old.unlink(missing_ok=True)
        token = uuid.uuid4().hex
        replace_file(folder / token, f"written by clipshot serve-ray on {os.uname().nodename}\n".encode())
    except OSError as exc:
        raise RayConfigError(f"cannot write to the adapter store {store}: {exc}. Fix: make "
                             f"{env_var('store')} a writable folder shared by every Ray node.") from None
    return token


def replica_gpus(settings: Settings, cluster_gpus: float) -> float:
    """GPUs per detector replica: the setting, else 1 when the cluster has GPUs and the device may use one."""
    if settings.ray_num_gpus is not None:
        if settings.ray_num_gpus > 0 and settings.device == "cpu":
            log.warning("%s=%s reserves GPUs that %s=cpu leaves unused", env_var("ray_num_gpus"),
                        settings.ray_num_gpus, env_var("device"))
        if settings.ray_num_gpus == 0 and settings.device.startswith("cuda"):
            raise RayConfigError(f"{env_var('device')}={settings.device} but {env_var('ray_num_gpus')}=0: Ray hides "
                                 f"every GPU from such a replica. Fix: set {env_var('ray_num_gpus')} >= 1 or "
                                 f"{env_var('device')}=auto.")
        return settings.ray_num_gpus
    return 1.0 if cluster_gpus > 0 and settings.device != "cpu" else 0.0


def build_application(settings: Settings, store_token: str, *, num_gpus: float) -> Any:
    """The bound Ray Serve application: router -> detector replicas (+ fine-tune workers)."""
    serve = import_serve()
    from app.distributed.deployments import DetectorReplica, Router

    dump = settings.model_dump(mode="json")
    dedicated = settings.ray_finetune_workers > 0
    replica_options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": settings.ray_num_cpus, "num_gpus": num_gpus},
        "max_ongoing_requests": settings.ray_max_ongoing_requests,
        "graceful_shutdown_timeout_s": 30,  # as `clipshot serve`'s drain
        "health_check_period_s": 10,
        # a constructor that fails (no weights, store not shared) fails the same way again: give up soon
        "max_constructor_retry_count": CONSTRUCTOR_RETRIES,
    }
    if settings.ray_min_replicas == settings.ray_max_replicas:
        scaling: dict[str, Any] = {"num_replicas": settings.ray_min_replicas}
    else:
        scaling = {"autoscaling_config": {"min_replicas": settings.ray_min_replicas,
                                          "max_replicas": settings.ray_max_replicas,
                                          "target_ongoing_requests": settings.ray_target_ongoing_requests}}
    detector = serve.deployment(DetectorReplica, name="detector", **replica_options, **scaling).bind(
        {**dump, "job_worker": not dedicated}, store_token)
    finetune = None
    if dedicated:
        finetune = serve.deployment(DetectorReplica, name="finetune", num_replicas=settings.ray_finetune_workers,
                                    **replica_options).bind({**dump, "job_worker": True}, store_token)
    router = serve.deployment(Router, name="router", num_replicas=settings.ray_router_replicas,
                              ray_actor_options={"num_cpus": ROUTER_CPUS},
                              max_ongoing_requests=settings.max_pending_images)
    return router.bind(detector, dump, finetune)


def preflight(settings: Settings) -> str:
    """Everything checkable before Ray is touched; returns the store token."""
    from app.main import StartupError, open_job_store

    import_serve()
    settings.validate_security()
    check_settings(settings)
    if settings.job_db:
        try:
            open_job_store(settings).close()
        except StartupError as exc:
            raise RayConfigError(str(exc)) from None
    return write_store_token(settings.store)


def connect(settings: Settings) -> None:
    """Join (or start) the Ray cluster; a wrong address is one line, not a traceback."""
    import ray

    address = settings.ray_address or None
    if address not in (None, "auto", "local"):
        _check_reachable(address)
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, namespace="clipshot",
                 ignore_reinit_error=True, logging_level=logging.getLogger().getEffectiveLevel())
    except Exception as exc:  # ConnectionError, RuntimeError, ValueError depending on the address form
        raise RayConfigError(f"cannot reach the Ray cluster at {address!r}: {' '.join(str(exc).split())[:300]} "
                             f"Fix: start it (`ray start --head`) or correct {env_var('ray_address')} (empty "
                             "starts a private one).") from None


def _check_reachable(address: str) -> None:
    """A TCP connect to ``host:port`` first: ``ray.init`` retries an unreachable head for minutes."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=CONNECT_TIMEOUT_S):
            pass
    except (OSError, ValueError) as exc:
        raise RayConfigError(f"cannot reach the Ray cluster at {address!r} ({exc}). Fix: start it (`ray start "
                             f"--head`) or correct {env_var('ray_address')} (host:6379, ray://host:10001, `auto`, "
                             "or empty to start a private one).") from None


def deploy(settings: Settings) -> Any:
    """Preflight, connect, deploy, and wait until every replica is up; returns the router's handle."""
    token = preflight(settings)  # first: it is what says "Ray is not installed"
    import ray

    connect(settings)
    serve = import_serve()
    gpus = replica_gpus(settings, ray.cluster_resources().get("GPU", 0.0))
    serve.start(http_options={"host": settings.host, "port": settings.port})
    try:
        return serve.run(build_application(settings, token, num_gpus=gpus), name=APP_NAME, route_prefix="/")
    except Exception as exc:  # a replica's constructor failed: surface its own one-line reason
        raise RayConfigError(f"the detector replicas did not start: {startup_reason(exc, _status_text(serve))}"
                             ) from None


def _status_text(serve: Any) -> str:
    """Every deployment's status message (where Ray keeps a failed constructor's traceback)."""
    try:
        application = serve.status().applications[APP_NAME]
        return "\n".join([application.message, *(d.message for d in application.deployments.values())])
    except Exception:  # status itself unavailable: the exception text is all there is
        return ""


def startup_reason(exc: BaseException, detail: str = "") -> str:
    """The last ``StartupError``/``StoreNotShared`` message in a deployment failure, else its first line."""
    text = f"{exc}\n{detail}"
    found = re.findall(r"(?:StartupError|StoreNotShared|ValidationError)[^:\n]*: ([^\n]+(?:\nFix:[^\n]+)?)", text)
    return " ".join(found[-1].split()) if found else (text.strip().splitlines() or [type(exc).__name__])[0][:300]


def app_builder(args: dict[str, Any] | None = None) -> Any:
    """``import_path: app.distributed.launch:app_builder`` for ``serve run`` and KubeRay's RayService.

    Settings come from the pods' ``CLIPSHOT_*`` variables; ``args`` (the serve config's ``args``) may
    override any of them by field name. The cluster already exists, so GPUs follow ``ray_num_gpus``
    (empty: 1 per replica unless ``device`` is ``cpu``).
    """
    settings = Settings(**(args or {}))
    token = preflight(settings)
    return build_application(settings, token, num_gpus=replica_gpus(settings, cluster_gpus=1.0))


__all__ = ["RayConfigError", "app_builder", "build_application", "deploy", "preflight", "replica_gpus"]
