"""Settings parsing/validation, the security refusal, auth dependencies, metrics and the reference docs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import ValidationError

from app.api.deps import AdminDep, ClientDep, MetricsAccessDep, SettingsDep
from app.core.config import InsecureConfigurationError, Settings, env_var
from app.core.settings_doc import render_settings_markdown
from app.errors import OverloadedError, install_error_handlers
from app.metrics import Metrics, RequestMetricsMiddleware, render_metrics_markdown

DOCS = Path(__file__).resolve().parents[1] / "docs" / "reference"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    """No stray CLIPSHOT_* variables or .env file from the developer's shell leak into these tests."""
    import os

    for name in list(os.environ):
        if name.upper().startswith("CLIPSHOT_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def make(**kw) -> Settings:
    return Settings(_env_file=None, **kw)


# --- settings -------------------------------------------------------------------------------


def test_defaults():
    s = make()
    assert s.backbone == "open_clip:ViT-B-16-plus-240:laion400m_e32"
    assert (s.device, s.precision, s.image_size) == ("auto", "auto", None)
    assert s.store == Path("store")
    assert (s.adapter_cache_device, s.adapter_cache_cpu, s.max_batch_size) == (8, 64, 32)
    assert (s.min_shots, s.max_shots, s.recommended_min_shots, s.max_predict_images) == (1, 16, 4, 32)
    assert s.max_upload_bytes == 20 * 1024 * 1024 and s.max_image_pixels == 40_000_000
    assert s.admin_keys == [] and s.client_keys == [] and not s.insecure_dev and not s.metrics_require_key


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("k1,k2", ["k1", "k2"]),
        (" k1 , k2 ,", ["k1", "k2"]),
        ('["k1", "k2"]', ["k1", "k2"]),
        ("single", ["single"]),
        ("", []),
        ("k1,k1", ["k1"]),
    ],
)
def test_key_lists_from_env(monkeypatch, raw, expected):
    monkeypatch.setenv("CLIPSHOT_ADMIN_KEYS", raw)
    monkeypatch.setenv("CLIPSHOT_CLIENT_KEYS", raw)
    s = make()
    assert s.admin_keys == expected and s.client_keys == expected


def test_env_and_dotenv(monkeypatch, tmp_path):
    (tmp_path / ".env").write_text("CLIPSHOT_PRECISION=bf16\nCLIPSHOT_PORT=9000\nOTHER_APP_VAR=x\n")
    monkeypatch.setenv("CLIPSHOT_PORT", "9100")  # real env wins over .env
    monkeypatch.setenv("CLIPSHOT_DEVICE", "CUDA:1")
    monkeypatch.setenv("CLIPSHOT_IMAGE_SIZE", "336")
    monkeypatch.setenv("CLIPSHOT_INSECURE_DEV", "true")
    s = Settings()
    assert (s.precision, s.port, s.device, s.image_size, s.insecure_dev) == (
        "bf16",
        9100,
        "cuda:1",
        336,
        True,
    )
    monkeypatch.setenv("CLIPSHOT_IMAGE_SIZE", "none")
    assert Settings().image_size is None


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"precision": "fp8"}, "fp32"),
        ({"device": "gpu"}, "cuda:N"),
        ({"device": "cuda:x"}, "cuda:N"),
        ({"max_batch_size": 0}, "greater than or equal to 1"),
        ({"max_batch_wait_ms": -1}, "greater than or equal to 0"),
        ({"port": 70000}, "less than or equal to 65535"),
        ({"min_shots": 5, "max_shots": 4, "recommended_min_shots": 4}, "min_shots"),
        ({"recommended_min_shots": 20}, "recommended_min_shots"),
        ({"max_shots": 16, "max_category_images": 8}, "max_category_images"),
        ({"max_request_bytes": 10, "max_upload_bytes": 11}, "max_request_bytes"),
        ({"max_pending_images": 8, "max_predict_images": 9}, "could never be admitted"),
        ({"admin_keys": "has space,ok"}, "whitespace"),
        ({"client_keys": '["unterminated'}, "JSON"),
    ],
)
def test_validation_errors_are_clear(kw, match):
    with pytest.raises(ValidationError, match=match):
        make(**kw)


def test_secrets_not_in_repr():
    assert "sekrit" not in repr(make(admin_keys="sekrit"))


def test_security_refuses_to_start_without_keys():
    with pytest.raises(InsecureConfigurationError, match="CLIPSHOT_ADMIN_KEYS"):
        make().validate_security()
    make(insecure_dev=True).validate_security()
    make(client_keys="c").validate_security()
    make(admin_keys="a").validate_security()


def test_settings_doc_matches_model():
    doc = (DOCS / "settings.md").read_text()
    for name, field in Settings.model_fields.items():
        row = next((line for line in doc.splitlines() if line.startswith(f"| `{env_var(name)}` |")), None)
        assert row is not None, f"{env_var(name)} missing from docs/reference/settings.md"
        assert field.description and field.description.split("`")[0][:20] in row
    assert doc == render_settings_markdown(), (
        "regenerate: python -m app.core.settings_doc > docs/reference/settings.md"
    )


# --- auth dependencies ----------------------------------------------------------------------


def app_with(settings: Settings) -> TestClient:
    app = FastAPI()
    app.state.settings = settings
    install_error_handlers(app)

    @app.get("/admin")
    def admin(p: AdminDep) -> dict:
        return {"scope": p.scope, "key_id": p.key_id}

    @app.get("/predict")
    def predict(p: ClientDep, s: SettingsDep) -> dict:
        return {"scope": p.scope, "max": s.max_predict_images}

    @app.get("/metrics-ish")
    def metrics(p: MetricsAccessDep) -> dict:
        return {"ok": True}

    return TestClient(app)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_auth_scopes():
    c = app_with(make(admin_keys="adm1,adm2", client_keys="cli"))
    assert c.get("/admin", headers=bearer("adm2")).json()["scope"] == "admin"
    assert c.get("/predict", headers=bearer("adm1")).json() == {
        "scope": "admin",
        "max": 32,
    }  # admin may predict
    assert c.get("/predict", headers=bearer("cli")).json()["scope"] == "client"
    r = c.get("/admin", headers=bearer("cli"))
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    assert c.get("/metrics-ish").status_code == 200  # metrics_require_key is off
    key_id = c.get("/admin", headers=bearer("adm1")).json()["key_id"]
    assert "adm1" not in key_id and len(key_id) == 12


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "adm"},
        {"Authorization": "Basic adm"},
        {"Authorization": "Bearer "},
        bearer("nope"),
    ],
    ids=["missing", "no-scheme", "basic", "empty", "unknown"],
)
def test_auth_rejections_are_401_with_challenge(headers):
    c = app_with(make(admin_keys="adm", client_keys="cli", metrics_require_key=True))
    for path in ("/admin", "/predict", "/metrics-ish"):
        r = c.get(path, headers=headers)
        assert r.status_code == 401, path
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert set(r.json()["error"]) == {"code", "message"}


def test_insecure_dev_allows_everything_and_no_keys_fails_closed():
    c = app_with(make(insecure_dev=True))
    assert c.get("/admin").status_code == 200 and c.get("/predict").status_code == 200
    c = app_with(make())  # would not start; if it did, nothing is allowed
    assert c.get("/admin").status_code == 401 and c.get("/predict").status_code == 401


def test_keys_compared_on_digests_without_early_exit(monkeypatch):
    import app.api.deps as deps

    calls = []
    real = deps.hmac.compare_digest
    monkeypatch.setattr(deps.hmac, "compare_digest", lambda a, b: calls.append(len(a)) or real(a, b))
    c = app_with(make(admin_keys="a1,a2,a3", client_keys="c1,c2"))
    assert c.get("/predict", headers=bearer("a1")).status_code == 200
    assert calls == [32] * 5  # every key of both scopes, always on fixed-length digests


# --- errors and metrics ---------------------------------------------------------------------


def test_overloaded_sets_retry_after():
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/busy")
    def busy() -> None:
        raise OverloadedError("queue full", retry_after=2.2)

    r = TestClient(app).get("/busy")
    assert r.status_code == 503 and r.headers["retry-after"] == "3"
    assert r.json() == {"error": {"code": "overloaded", "message": "queue full"}}
    assert TestClient(app).get("/nope").json()["error"]["code"] == "not_found"


def test_metrics_per_app_registry_and_route_template():
    m1, m2 = Metrics(), Metrics()  # two apps in one process must not collide
    app = FastAPI()
    app.add_middleware(RequestMetricsMiddleware, metrics=m1)

    @app.get("/items/{item_id}")
    def item(item_id: int) -> dict:
        return {"id": item_id}

    c = TestClient(app)
    c.get("/items/1")
    c.get("/items/2")
    c.get("/missing")
    body = m1.render()[0].decode()
    series = (
        'clipshot_http_request_duration_seconds_count{method="GET",route="/items/{item_id}",status="200"}'
    )
    assert f"{series} 2.0" in body
    assert 'route="unmatched",status="404"' in body
    assert "process_resident_memory_bytes " in body  # host RAM has its own (standard) family now
    assert 'kind="rss"' not in body and 'kind="peak_rss"' not in body  # ...not a "device memory" kind
    assert 'clipshot_build_info{' in body and 'version="' in body
    assert "items" not in m2.render()[0].decode()


def test_metrics_doc_covers_every_family():
    doc = (DOCS / "metrics.md").read_text()
    m = Metrics()
    rows = {r[0]: r for r in re.findall(r"^\| `(\w+)` \| (\w+) \| ([^|]*) \|", doc, flags=re.M)}
    labels_by_name = {s.name: s.labels for s in m.specs}
    families = list(m.registry.collect())
    assert len(families) == len(m.specs)
    for fam in families:
        name = fam.name + {"counter": "_total", "info": "_info"}.get(fam.type, "")
        assert name in rows, f"{name} missing from docs/reference/metrics.md"
        assert rows[name][1] == fam.type
        assert re.findall(r"`(\w+)`", rows[name][2]) == list(labels_by_name[name])
    assert doc == render_metrics_markdown(), "regenerate: python -m app.metrics > docs/reference/metrics.md"
