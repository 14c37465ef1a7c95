"""/docs and /redoc work without network: every asset the pages load is served by the service itself,
and generated clients get readable OpenAPI operationIds."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import pytest
from fastapi.testclient import TestClient

from app.core.config import Settings
from app.main import create_app


class _Assets(HTMLParser):
    """Every URL an HTML page pulls in: script src, link href, img src."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        named = dict(attrs)
        for attr in ("src", "href"):
            if tag in ("script", "link", "img") and named.get(attr):
                self.urls.append(named[attr])


def assets(html: str) -> list[str]:
    parser = _Assets()
    parser.feed(html)
    return parser.urls


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    # No lifespan (no `with`): the pages and the schema need no backbone.
    return TestClient(create_app(Settings(_env_file=None, insecure_dev=True,
                                          store=tmp_path_factory.mktemp("store"))))


@pytest.mark.parametrize(("page", "needs"), [
    ("/docs", ["swagger-ui-bundle.js", "swagger-ui.css"]),
    ("/redoc", ["redoc.standalone.js"]),
    ("/console", ["console.js", "console.css"]),
])
def test_pages_load_every_asset_from_the_service_itself(client, page, needs):
    r = client.get(page)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    urls = assets(r.text)
    for name in needs:
        assert any(u.endswith(name) for u in urls), (name, urls)
    for url in urls:
        assert not re.match(r"^(https?:)?//", url), f"{page} loads {url} from the network"
        absolute = url if url.startswith("/") else "/" + url  # the console's links are relative to /
        asset = client.get(absolute)
        assert asset.status_code == 200, (url, asset.status_code)
        assert len(asset.content) > 100, url  # a real bundle, not an empty placeholder
    # No CDN host anywhere in the page's own code either (e.g. a font or validator fetched from script).
    assert "cdn.jsdelivr" not in r.text and "fonts.googleapis" not in r.text and "unpkg.com" not in r.text


def test_console_allows_only_its_own_scripts(client):
    csp = client.get("/console").headers["content-security-policy"]
    # No inline script and no other origin may run next to the operator's key (XSS); the browser test runs
    # the whole console under this policy, so an inline handler would show up there as a blocked script.
    assert "script-src 'self';" in csp and "connect-src 'self'" in csp and "unsafe" not in csp


def test_swagger_ui_does_not_call_the_online_validator(client):
    assert '"validatorUrl": null' in client.get("/docs").text


def test_operation_ids_read_like_function_names(client):
    schema = client.get("/openapi.json").json()
    ids = {(path, method): op["operationId"] for path, ops in schema["paths"].items() for method, op in ops.items()}
    # What a generated client calls these: short, and unique across the API.
    assert ids[("/v1/categories/{category}/predict", "post")] == "predict_category"
    assert ids[("/v1/categories/{category}/shots", "post")] == "register_shots"
    assert ids[("/v1/jobs/{job_id}", "get")] == "get_job"
    assert len(set(ids.values())) == len(ids)
    for op_id in ids.values():
        assert re.fullmatch(r"[a-z][a-z0-9_]{0,40}", op_id) and "_v1_" not in op_id, op_id
