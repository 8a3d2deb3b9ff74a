"""A Swagger UI page whose assets dx serves itself (from the ``swagger-ui-bundle`` package), so
API docs work on a closed network: FastAPI's default page loads them from a CDN."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from swagger_ui_bundle import swagger_ui_path


def mount_swagger(app: FastAPI, openapi_url: str, *, path: str = "/docs",
                  title: str = "API docs") -> None:
    """Serve the Swagger UI for ``openapi_url`` at ``path``, assets under ``path/assets``."""
    assets = f"{path}/assets"
    app.mount(assets, StaticFiles(directory=swagger_ui_path), name=f"swagger-assets{path}")

    @app.get(path, include_in_schema=False)
    async def _docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=openapi_url, title=title,
                                   swagger_js_url=f"{assets}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{assets}/swagger-ui.css",
                                   swagger_favicon_url=f"{assets}/favicon-32x32.png")
