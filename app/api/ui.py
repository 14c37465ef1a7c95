"""Pages for people: Swagger UI at ``/docs``, ReDoc at ``/redoc`` and the operator console at ``/console``.

Everything is served from this process, never from a CDN: production lines are often air-gapped, and
FastAPI's default ``/docs`` is a blank page there. The Swagger UI / ReDoc bundles come from the
``fastapi-offline`` package (MIT; it ships the upstream ``swagger-ui-dist`` and ``redoc`` bundles, whose
own licences are named in their headers); the console's HTML/JS/CSS are package data in
``app/console/``. The pages themselves are public (they hold no data); every API call they make needs
a key, which the console asks for and sends as ``Authorization: Bearer``.
"""

from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles

DOCS_ASSETS = Path(fastapi_offline.__file__).resolve().parent / "static"
CONSOLE_DIR = Path(__file__).resolve().parent.parent / "console"
DOCS_ASSETS_URL = "/docs-assets"
CONSOLE_URL = "/console"
CONSOLE_ASSETS_URL = "/console/assets"
# validatorUrl=None: Swagger UI would otherwise ask validator.swagger.io to badge the schema (network).
SWAGGER_PARAMETERS = {"validatorUrl": None, "persistAuthorization": True}
# The console holds an API key: only its own files may run, and it may talk to this service alone. Server
# strings (file names, errors) are inserted as text, never HTML, so nothing needs 'unsafe-inline'.
CONSOLE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'none'",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


def install_ui(app: FastAPI, *, docs_url: str = "/docs", redoc_url: str = "/redoc") -> None:
    """Add the offline docs and the console to ``app`` (which must be built with docs_url=redoc_url=None)."""
    openapi_url = app.openapi_url or "/openapi.json"
    oauth_url = f"{docs_url}/oauth2-redirect"
    app.mount(DOCS_ASSETS_URL, StaticFiles(directory=DOCS_ASSETS), name="docs-assets")
    app.mount(CONSOLE_ASSETS_URL, StaticFiles(directory=CONSOLE_DIR), name="console-assets")

    def root(request: Request) -> str:
        return request.scope.get("root_path", "")

    @app.get(docs_url, include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        base = root(request)
        return get_swagger_ui_html(
            openapi_url=base + openapi_url, title=f"{app.title} - Swagger UI", oauth2_redirect_url=base + oauth_url,
            swagger_js_url=f"{base}{DOCS_ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{base}{DOCS_ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{base}{DOCS_ASSETS_URL}/favicon.png", swagger_ui_parameters=SWAGGER_PARAMETERS,
        )

    @app.get(oauth_url, include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get(redoc_url, include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        base = root(request)
        return get_redoc_html(openapi_url=base + openapi_url, title=f"{app.title} - ReDoc",
                              redoc_js_url=f"{base}{DOCS_ASSETS_URL}/redoc.standalone.js",
                              redoc_favicon_url=f"{base}{DOCS_ASSETS_URL}/favicon.png", with_google_fonts=False)

    @app.get(CONSOLE_URL, include_in_schema=False)
    async def console() -> FileResponse:
        return FileResponse(CONSOLE_DIR / "index.html", media_type="text/html", headers=CONSOLE_HEADERS)


__all__ = ["CONSOLE_URL", "DOCS_ASSETS", "install_ui"]
