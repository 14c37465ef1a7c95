"""docs/reference/api.md is generated from the routes; it must match them, and every error answer a route
documents must use the one error body the handlers actually send."""

from __future__ import annotations

import pytest
from conftest import REPO

from app.api.reference import render_api_markdown
from app.core.config import Settings
from app.main import create_app


@pytest.fixture(scope="module")
def app():
    return create_app(Settings(_env_file=None, insecure_dev=True))


def test_api_reference_is_current(app):
    committed = (REPO / "docs" / "reference" / "api.md").read_text()
    assert committed == render_api_markdown(app), "regenerate: python -m app.api.reference > docs/reference/api.md"


def test_every_operation_is_documented_with_its_key_and_errors(app):
    text = render_api_markdown(app)
    for path, operations in app.openapi()["paths"].items():
        for method, operation in operations.items():
            assert f"## `{method.upper()} {path}`" in text
            for status, answer in operation["responses"].items():
                if status.startswith(("4", "5")) and path not in ("/readyz",):
                    ref = answer["content"]["application/json"]["schema"]["$ref"]
                    assert ref.endswith("/ErrorBody"), (method, path, status)
            if path.startswith("/v1/"):
                assert "401" in operation["responses"], f"{method} {path} needs a key but documents no 401"
