"""The web application: dashboard pages, REST API, metrics and health checks in one app.

Everything reads and steers through ``node.overview`` and the jobs manager; this
module only wires requests to them: who is asking, sessions, security headers.  What the
routers share (the per-process state, sessions, the job-id type) is in ``node.web.state``.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlencode

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool
from starlette.middleware.trustedhost import TrustedHostMiddleware

from node import __version__
from node.context import NodeContext
from node.web import api, metrics, pages, stow
from node.web.auth import CSRF_COOKIE, FLASH_COOKIE, SESSION_COOKIE, WebSession, encode_flash
from node.web.state import HERE, LoginRequired, WebState, web_state

log = logging.getLogger(__name__)

SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self'; style-src 'self'; script-src 'self'; "
        "frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
    ),
}


async def _sessions_and_headers(
    request: Request, call_next: Callable[[Request], Awaitable[Response]]
) -> Response:
    web = web_state(request)
    if SESSION_COOKIE in request.cookies and web.login_required:
        request.state.session = await run_in_threadpool(web.load_session, request)
    else:  # no database read: floods of anonymous requests stay cheap
        request.state.session = web.load_session(request)
    response = await call_next(request)
    _write_cookies(request.state.session, response, secure=request.url.scheme == "https")
    response.headers.update(SECURITY_HEADERS)
    return response


def _write_cookies(session: WebSession, response: Response, secure: bool) -> None:
    """Set or clear the cookies the request changed (login, CSRF, messages)."""
    # lax: links from mail keep the login; forms carry CSRF tokens
    options: dict[str, Any] = {"httponly": True, "samesite": "lax", "secure": secure}
    if SESSION_COOKIE in session.changed:
        if session.token:
            response.set_cookie(SESSION_COOKIE, session.token, **options)
        else:
            response.delete_cookie(SESSION_COOKIE)
    if CSRF_COOKIE in session.changed:
        response.set_cookie(CSRF_COOKIE, session.csrf, **options)
    if FLASH_COOKIE in session.changed:
        if session.flash:
            response.set_cookie(FLASH_COOKIE, encode_flash(session.flash), **options)
        else:
            response.delete_cookie(FLASH_COOKIE)


def _login_redirect(request: Request, _exc: Exception) -> Response:
    if request.url.path.startswith("/partials/"):
        return JSONResponse({"detail": "login required"}, status_code=401)
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    login = request.app.url_path_for("login_page")
    return RedirectResponse(f"{login}?{urlencode({'next': target})}", status_code=303)


@functools.lru_cache(maxsize=4)
def _model_problem(path: str, _mtime_ns: int, _size: int) -> str | None:
    """None when onnxruntime can open the model and read its metadata (cached per file)."""
    import onnxruntime

    try:
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        session.get_modelmeta()
    except Exception as exc:  # noqa: BLE001 - any failure means "not loadable", say which
        return f"not loadable by onnxruntime: {exc.__class__.__name__}: {str(exc)[:200]}"
    return None


def readiness(ctx: NodeContext) -> dict[str, str]:
    """Database reachable, spool writable, model loadable: ``ok`` or what is wrong."""
    checks: dict[str, str] = {}
    try:
        with ctx.engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except SQLAlchemyError as exc:
        checks["database"] = f"unreachable: {exc.__class__.__name__}"
    probe = ctx.spool.root / f".readyz-{os.getpid()}-{threading.get_ident()}"
    try:
        probe.write_bytes(b"ok")
        probe.unlink()
        checks["spool"] = "ok"
    except OSError as exc:
        checks["spool"] = f"not writable: {exc.strerror or exc}"
    model = ctx.settings.model_file
    try:
        stat = model.stat()
    except OSError:
        checks["model"] = f"{model} is missing"
    else:
        checks["model"] = _model_problem(str(model), stat.st_mtime_ns, stat.st_size) or "ok"
    return checks


def create_app(ctx: NodeContext) -> FastAPI:
    """The whole web application for one node context."""
    app = FastAPI(
        title="ct-denoise-node",
        version=__version__,
        description=(
            "Look at and steer the node's job table. On 127.0.0.1 no login is needed; "
            "bound elsewhere, use HTTP Basic with a `web_users` account (admins may act)."
        ),
        openapi_url="/api/v1/openapi.json",
        docs_url=None,  # Swagger UI would load scripts from a CDN
        redoc_url=None,
    )
    web = WebState(ctx)
    app.state.web = web
    if web.login_required and not ctx.settings.web_users:
        log.warning(
            "the dashboard on %s needs a login but no web_users are configured: add one "
            "(denoise-node web hash-password)",
            ctx.settings.web_host,
        )
    app.middleware("http")(_sessions_and_headers)
    if not web.login_required:
        # Refuse other Host names: a DNS-rebinding page cannot use the local admin.
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=["127.0.0.1", "localhost"])
    app.add_exception_handler(LoginRequired, _login_redirect)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    app.include_router(api.router(list(ctx.settings.destinations)))
    app.include_router(pages.router)
    app.include_router(stow.router(ctx))

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        """The process answers: for liveness probes (on the event loop, past busy threads)."""
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    def readyz() -> JSONResponse:
        """Ready to work: database, spool and model; 503 names what is wrong."""
        checks = readiness(ctx)
        ready = all(value == "ok" for value in checks.values())
        return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)

    app.include_router(metrics.router(ctx, web.destination_checks))
    return app
