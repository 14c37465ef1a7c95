"""The Ray Serve layout's parts that need no cluster: the in-process HTTP replay, version pinning, the
router's failure mapping and ``category@version`` resolution, and ``serve-ray``'s one-line start-up errors.

The cluster itself (routing, replica death, activation across replicas) is ``test_ray_serve.py``.
"""

from __future__ import annotations

import asyncio
import sys

import httpx
import pytest
from pg_fixtures import in_ci

from app.api.routes.predict import PINNED_VERSION_SCOPE
from app.cli.main import main
from app.core.config import Settings
from app.core.identity import replica_name
from app.distributed.asgi_call import HttpRequest, HttpResponse, call_asgi
from app.main import create_app
from tests.helpers.jobs import ADMIN, image_bytes, make_settings, shots
from tests.helpers.predict import good

if not in_ci():
    pytest.importorskip("ray", reason="the ray extra is not installed (pip install -e '.[ray]'); CI installs it")
from ray.exceptions import ActorDiedError  # noqa: E402

from app.distributed import deployments  # noqa: E402
from app.distributed.launch import RayConfigError, check_settings, replica_gpus, startup_reason  # noqa: E402

CLIENT = {"Authorization": "Bearer client-key"}


def as_record(request: httpx.Request) -> HttpRequest:
    """What the router forwards for this request (httpx encodes the multipart body)."""
    return HttpRequest(method=request.method, path=request.url.path, query_string=request.url.query,
                       headers=list(request.headers.raw), body=request.read())


def test_replayed_requests_behave_as_http_and_only_the_scope_can_pin_a_version(tmp_path, tiny_backbone):
    app = create_app(make_settings(tmp_path / "store"), backbone=tiny_backbone)
    base = "http://replica"

    async def scenario() -> dict[str, HttpResponse]:
        async with app.router.lifespan_context(app):
            out = {}
            post = httpx.Request("POST", f"{base}/v1/categories/widget/shots", headers=ADMIN, files=shots(range(4)),
                                 data={"finetune": "false"})
            out["register"] = await call_asgi(app, as_record(post))
            put = httpx.Request("PUT", f"{base}/v1/categories/widget/threshold", headers=ADMIN,
                                json={"target_false_alarm_rate": 0.1})
            out["v2"] = await call_asgi(app, as_record(put))
            files = [("files", ("p.png", image_bytes(7), "image/png"))]
            predict = httpx.Request("POST", f"{base}/v1/categories/widget/predict?heatmap=none", headers=CLIENT,
                                    files=files)
            out["active"] = await call_asgi(app, as_record(predict))
            out["pinned"] = await call_asgi(app, as_record(predict), {PINNED_VERSION_SCOPE: 1})
            spoof = httpx.Request("POST", f"{base}/v1/categories/widget/predict",
                                  params={"heatmap": "none", PINNED_VERSION_SCOPE: "1"},
                                  headers={**CLIENT, PINNED_VERSION_SCOPE: "1"}, files=files)
            out["spoofed"] = await call_asgi(app, as_record(spoof))
            anonymous = httpx.Request("POST", f"{base}/v1/categories/widget/predict", files=files)
            out["anonymous"] = await call_asgi(app, as_record(anonymous))
            # what the router forwards for a key it knows no replica accepts: headers only, body left unread
            out["unread"] = await call_asgi(app, HttpRequest("POST", "/v1/categories/widget/predict",
                                                             headers=[(b"authorization", b"Bearer nope")]))
            return out

    out = asyncio.run(scenario())
    assert out["register"].status == 201, out["register"].body
    assert out["v2"].status == 200 and httpx.Response(200, content=out["v2"].body).json()["version"] == 2
    version = {k: httpx.Response(200, content=out[k].body).json()["adapter_version"]
               for k in ("active", "pinned", "spoofed")}
    assert version == {"active": 2, "pinned": 1, "spoofed": 2}
    body = httpx.Response(200, content=out["pinned"].body).json()
    assert body["replica"] == replica_name() == out["pinned"].header("X-Clipshot-Replica")
    assert out["anonymous"].status == 401 and out["anonymous"].header("www-authenticate").startswith("Bearer")
    assert out["unread"].status == 401 and b"invalid_key" in out["unread"].body


def test_model_ids_round_trip_and_reject_what_is_not_one():
    assert deployments.parse_model_id(deployments.model_id("metal-nut_2", 17)) == ("metal-nut_2", 17)
    for bad in ("", "widget", "widget@", "widget@v2", "@3", "../x@1", "widget@-1"):
        assert deployments.parse_model_id(bad) is None, bad


class Replica:
    """A deployment handle standing in for Ray's: records what the router forwards and with which model id;
    ``dead`` raises ActorDiedError from the call (what a SIGKILL mid-request produces, seen for real in
    test_ray_serve.py)."""

    def __init__(self, *, dead: bool) -> None:
        self.dead = dead
        self.routed: list[str | None] = []
        self.forwarded: list[HttpRequest] = []
        self.handle = self

    def options(self, *, multiplexed_model_id: str) -> Replica:
        self.routed.append(multiplexed_model_id)
        return self

    async def remote(self, request: HttpRequest) -> HttpResponse:
        self.forwarded.append(request)
        if self.dead:
            raise ActorDiedError()
        return HttpResponse(401, [(b"content-type", b"application/json")], b"{}")


def starlette_request(path: str, body: bytes, method: str = "POST", key: str | None = "client-key", *,
                      readable: bool = True):
    from starlette.requests import Request

    chunks = [body[i:i + 1000] for i in range(0, len(body), 1000)] or [b""]

    async def receive():
        assert readable, "the router read a body it should have left on the wire"
        chunk = chunks.pop(0)
        return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}

    headers = [(b"x-request-id", b"line-7.part-42"), (b"content-length", str(len(body)).encode())]
    if key is not None:
        headers.append((b"authorization", f"Bearer {key}".encode()))
    scope = {"type": "http", "method": method, "path": path, "query_string": b"", "client": ("127.0.0.1", 5),
             "headers": headers}
    return Request(scope, receive)


def test_router_resolves_the_active_version_and_turns_a_dead_replica_into_a_retryable_503(tmp_path, tiny_detector):
    from model_store import AdapterStore
    from model_store.adapters import save_adapter

    limits = {"max_request_bytes": 4096, "max_upload_bytes": 4096}
    settings = make_settings(tmp_path / "store").model_copy(update=limits)
    store = AdapterStore(settings.store)
    adapter = tiny_detector.fit_memory([good(s) for s in range(4)], category="widget", text=False,
                                       calibration_views=0)
    for _ in range(3):
        save_adapter(store, tiny_detector, adapter)
    store.activate("widget", 2)
    handle = Replica(dead=True)
    router = deployments.Router(handle, settings.model_dump(mode="json"))

    answer = asyncio.run(router(starlette_request("/v1/categories/widget/predict", b"x" * 10)))
    assert answer.status_code == 503 and answer.headers["retry-after"] == "1"
    assert b'"code":"replica_unavailable"' in answer.body and answer.headers["x-request-id"] == "line-7.part-42"
    assert handle.routed == ["widget@2"]  # the ACTIVE version (v3 exists but is not active)

    assert asyncio.run(router(starlette_request("/v1/categories/widget/predict", b"x" * 4097))).status_code == 413
    asyncio.run(router(starlette_request("/v1/categories/nothing/predict", b"")))
    asyncio.run(router(starlette_request("/v1/categories/widget", b"", method="GET")))
    assert handle.routed == ["widget@2"]  # unknown product and other routes: no model id, any replica


@pytest.mark.parametrize("key", [None, "stolen-key"])
def test_router_never_reads_the_body_of_a_request_no_key_admits(tmp_path, key):
    """Issue 13's auth-before-body holds under Ray too: the replica gets the headers only and answers 401."""
    handle = Replica(dead=False)
    router = deployments.Router(handle, make_settings(tmp_path / "store").model_dump(mode="json"))
    request = starlette_request("/v1/categories/widget/predict", b"x" * 100_000, key=key, readable=False)
    answer = asyncio.run(router(request))
    assert answer.status_code == 401
    (forwarded,) = handle.forwarded
    assert forwarded.body == b"" and b"content-length" not in dict(forwarded.headers)


def test_a_replica_refuses_a_store_the_launcher_did_not_write(tmp_path):
    from app.distributed.launch import write_store_token

    token = write_store_token(tmp_path / "shared")
    deployments.check_store_token(tmp_path / "shared", token)
    with pytest.raises(deployments.StoreNotShared, match="not the folder .* wrote to.*Fix: mount one shared"):
        deployments.check_store_token(tmp_path / "node-local", token)


def test_ray_settings_are_checked_before_anything_starts(tmp_path):
    with pytest.raises(ValueError, match="ray_min_replicas"):
        Settings(_env_file=None, ray_min_replicas=3, ray_max_replicas=2)
    several = make_settings(tmp_path).model_copy(update={"ray_max_replicas": 2})
    with pytest.raises(RayConfigError, match="SQLite job file.*CLIPSHOT_JOB_DB=postgresql"):
        check_settings(several)
    check_settings(several.model_copy(update={"job_db": "postgresql://u@h/db"}))
    base = make_settings(tmp_path)
    assert replica_gpus(base.model_copy(update={"device": "auto"}), cluster_gpus=8) == 1.0
    assert replica_gpus(base.model_copy(update={"device": "auto"}), cluster_gpus=0) == 0.0
    assert replica_gpus(base.model_copy(update={"device": "cpu"}), cluster_gpus=8) == 0.0
    assert replica_gpus(base.model_copy(update={"ray_num_gpus": 0.5}), cluster_gpus=8) == 0.5
    with pytest.raises(RayConfigError, match="hides every GPU"):
        replica_gpus(base.model_copy(update={"device": "cuda", "ray_num_gpus": 0}), cluster_gpus=8)


def test_a_replica_start_up_failure_is_reported_by_its_own_reason():
    text = ("Deploying application clipshot failed: ray::ServeReplica:clipshot:detector.initialize_and_get_metadata()"
            "\n  File ...\n"
            "app.main.StartupError: Cannot load backbone 'open_clip:X:/nope': no such file\nFix: set it\nmore")
    assert startup_reason(RuntimeError(text)) == "Cannot load backbone 'open_clip:X:/nope': no such file Fix: set it"
    assert startup_reason(RuntimeError("plain failure\nsecond line")) == "plain failure"


@pytest.mark.parametrize("env, expected", [
    ({"CLIPSHOT_RAY_MAX_REPLICAS": "2"}, "SQLite job file"),
    ({"CLIPSHOT_RAY_MAX_REPLICAS": "2", "CLIPSHOT_JOB_DB": "postgresql://u:secret@127.0.0.1:1/db"},
     "cannot connect to the job database"),
    ({"CLIPSHOT_RAY_MIN_REPLICAS": "4"}, "CLIPSHOT_RAY_MIN_REPLICAS (4) must be <= CLIPSHOT_RAY_MAX_REPLICAS (1)"),
    ({"CLIPSHOT_ADMIN_KEYS": "", "CLIPSHOT_CLIENT_KEYS": ""}, "No API keys configured"),
    ({"CLIPSHOT_RAY_ADDRESS": "127.0.0.1:1"}, "cannot reach the Ray cluster at '127.0.0.1:1'"),
])
def test_serve_ray_bad_configuration_is_one_line(monkeypatch, capsys, tmp_path, env, expected):
    monkeypatch.setenv("CLIPSHOT_STORE", str(tmp_path / "store"))
    monkeypatch.setenv("CLIPSHOT_ADMIN_KEYS", "a")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    code = main(["serve-ray"])
    err = capsys.readouterr().err.strip()
    assert code in (1, 2) and len(err.splitlines()) == 1 and expected in err, err
    assert "secret" not in err


def test_serve_ray_without_ray_installed_says_how_to_install(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("CLIPSHOT_STORE", str(tmp_path / "store"))
    monkeypatch.setenv("CLIPSHOT_ADMIN_KEYS", "a")
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails exactly as when it is absent
    assert main(["serve-ray"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("clipshot serve-ray: Ray Serve is not installed") and "pip install -e '.[ray]'" in err


def test_metrics_of_all_replicas_merge_into_one_exposition_labelled_by_replica():
    from prometheus_client.parser import text_string_to_metric_families

    from app.distributed.metrics_merge import merge_expositions
    from app.metrics import Metrics

    replicas = {"a@host:1": Metrics(), "b@host:2": Metrics()}
    replicas["a@host:1"].observe_verdict("widget", "normal", 0.1, 0.5)
    for _ in range(3):
        replicas["b@host:2"].observe_verdict("widget", "anomalous", 0.9, 0.5)
    merged = merge_expositions({name: m.render()[0].decode() for name, m in replicas.items()}).decode()
    families = {f.name: f for f in text_string_to_metric_families(merged)}
    assert merged.count("# TYPE clipshot_predictions_total counter") == 1  # each family once
    counts = {(s.labels["replica"], s.labels["verdict"]): s.value
              for s in families["clipshot_predictions"].samples if s.name == "clipshot_predictions_total"}
    assert counts == {("a@host:1", "normal"): 1.0, ("b@host:2", "anomalous"): 3.0}
    assert all("replica" in s.labels for f in families.values() for s in f.samples)
