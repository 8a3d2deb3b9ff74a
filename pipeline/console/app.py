"""The console's FastAPI application: pages, the JSON API, static assets, and the same
``/metrics``, ``/healthz`` and ``/readyz`` every dx worker serves."""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import psycopg
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.exposition import choose_encoder

from pipeline.api.errors import ApiError
from pipeline.api.store import Pool
from pipeline.config import DxConfig
from pipeline.console import api, api_admin, user_views, views
from pipeline.console.actions import Forbidden, UnknownRoute
from pipeline.console.dashboard import Dashboard
from pipeline.console.web import LoginRequired
from pipeline.errors import ServiceUnavailable
from pipeline.swagger import mount_swagger
from pipeline.tasks.query import EXACT_UP_TO

log = logging.getLogger(__name__)
HERE = Path(__file__).parent

REQUESTS = Counter("dx_console_requests_total", "Console HTTP requests by method and status "
                   "class (2xx, 3xx, 4xx, 5xx)", ["method", "status"])
LATENCY = Histogram("dx_console_request_seconds", "Console request duration",
                    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5, 10))

#: Pages load scripts and styles from dx only; the Swagger page needs its inline bootstrap.
CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
       "frame-ancestors 'none'; form-action 'self'")


def build_app(cfg: DxConfig, *, pool_size: int = 8) -> FastAPI:
    app = FastAPI(title="dx console API", version="1",
                  description="Operate dx: tasks, routes, audit. Roles viewer < operator < "
                              "admin; authenticate with 'Authorization: Bearer <token>' "
                              "('dx console token add').",
                  openapi_url="/api/openapi.json", docs_url=None, redoc_url=None)
    app.state.pool = Pool(cfg.database.url.get_secret_value(), pool_size,
                          connect_timeout_s=cfg.database.connect_timeout_s)
    app.state.dashboard = Dashboard(cfg)
    app.state.templates = Jinja2Templates(directory=HERE / "templates")
    app.state.templates.env.filters["ts"] = _ts
    app.state.templates.env.globals["exact_up_to"] = EXACT_UP_TO  # "≈" counts past it
    app.state.templates.env.filters["epoch"] = lambda v: _ts(dt.datetime.fromtimestamp(v, dt.UTC))
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    mount_swagger(app, "/api/openapi.json", path="/api/docs", title="dx console API")
    app.include_router(views.router)
    app.include_router(api_admin.router)
    app.include_router(user_views.router)
    app.include_router(api.router)
    app.include_router(api_admin.api_router)

    @app.middleware("http")
    async def _observe(request: Request,
                       call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        start = time.perf_counter()
        response = await call_next(request)
        LATENCY.observe(time.perf_counter() - start)
        REQUESTS.labels(request.method, f"{response.status_code // 100}xx").inc()
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "same-origin")
        response.headers.setdefault("X-Frame-Options", "DENY")
        if not request.url.path.startswith("/api/docs"):
            response.headers.setdefault("Content-Security-Policy", CSP)
        return response

    def _wants_json(request: Request) -> bool:
        return request.url.path.startswith("/api/") or \
            "application/json" in request.headers.get("accept", "")

    @app.exception_handler(LoginRequired)
    async def _login(request: Request, err: LoginRequired) -> Response:
        if _wants_json(request) or request.method != "GET":
            return JSONResponse({"detail": "log in or send a bearer token"}, 401,
                                headers={"WWW-Authenticate": "Bearer"})
        return views.login_redirect(request)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, err: HTTPException) -> Response:
        return _error(request, err.status_code, str(err.detail), dict(err.headers or {}))

    @app.exception_handler(UnknownRoute)
    async def _unknown_route(request: Request, err: UnknownRoute) -> Response:
        return _error(request, 404, str(err), {})

    @app.exception_handler(Forbidden)
    async def _forbidden(request: Request, err: Forbidden) -> Response:
        return _error(request, 403, str(err), {})

    @app.exception_handler(ServiceUnavailable)
    async def _unavailable(request: Request, err: ServiceUnavailable) -> Response:
        return _error(request, 503, "the database is unreachable; retry shortly",
                      {"Retry-After": "2"})

    @app.exception_handler(psycopg.OperationalError)
    async def _db_down(request: Request, err: psycopg.OperationalError) -> Response:
        log.warning("database error: %s", str(err).strip().splitlines()[0] if str(err) else err)
        return _error(request, 503, "database error; retry shortly", {"Retry-After": "2"})

    @app.exception_handler(ApiError)
    async def _busy(request: Request, err: ApiError) -> Response:
        return _error(request, err.status, str(err), err.headers)

    def _error(request: Request, status: int, detail: str, headers: dict[str, str]) -> Response:
        if _wants_json(request):
            return JSONResponse({"detail": detail}, status, headers=headers)
        return app.state.templates.TemplateResponse(  # type: ignore[no-any-return]
            request, "error.html", {"status": status, "detail": detail, "me": None},
            status_code=status, headers=headers)

    @app.get("/metrics", include_in_schema=False)
    def _metrics(request: Request) -> Response:
        encoder, content_type = choose_encoder(request.headers.get("accept", ""))
        return Response(encoder(REGISTRY), media_type=content_type)

    @app.get("/healthz", include_in_schema=False)
    def _healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    def _readyz() -> Response:
        try:
            with app.state.pool.connection() as conn:
                conn.execute("SELECT 1")
                conn.rollback()
        except (ServiceUnavailable, psycopg.Error, ApiError) as err:
            return JSONResponse({"status": "not ready", "reason": f"database: {err}"}, 503)
        return JSONResponse({"status": "ready", "reason": "database reachable"})

    @app.get("/favicon.ico", include_in_schema=False)
    def _favicon() -> Response:
        return PlainTextResponse("", 204)

    return app


def _ts(value: Any) -> str:
    """A timestamp as the pages show it (UTC, seconds)."""
    if value is None:
        return ""
    try:
        return str(value.astimezone().strftime("%Y-%m-%d %H:%M:%S %Z"))
    except AttributeError:
        return str(value)
