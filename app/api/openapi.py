"""Make ``/openapi.json`` state the upload limits the server enforces, which come from settings at runtime.

Why not ``File(max_length=...)``: FastAPI would then enforce the count itself with a generic 422, while the
service answers too many images with 413 ``too_many_images`` and too many shots with 400 ``too_many_shots``
(documented codes). The schema only gains ``minItems``/``maxItems`` on the ``files`` arrays.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from app.core.config import Settings


def document_upload_limits(app: FastAPI, settings: Settings) -> None:
    """Wrap ``app.openapi`` so the generated schema carries the settings' file-count limits."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = generate()  # FastAPI keeps it as app.openapi_schema: the limits are added once
        add_file_limits(schema, settings)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]  # replacing app.openapi is FastAPI's documented hook


def add_file_limits(schema: dict[str, Any], settings: Settings) -> None:
    """Set ``minItems``/``maxItems`` of every multipart ``files`` array: shots for registration, else predict."""
    components = schema.get("components", {}).get("schemas", {})
    for path, operations in schema.get("paths", {}).items():
        limits = (settings.min_shots, settings.max_shots) if path.endswith("/shots") else \
            (1, settings.max_predict_images)
        for operation in operations.values():
            body = operation.get("requestBody", {}).get("content", {}).get("multipart/form-data", {})
            ref = body.get("schema", {}).get("$ref", "")
            files = components.get(ref.rsplit("/", 1)[-1], {}).get("properties", {}).get("files")
            for variant in [files or {}, *(files or {}).get("anyOf", [])]:
                if variant.get("type") == "array":
                    variant["minItems"], variant["maxItems"] = limits
