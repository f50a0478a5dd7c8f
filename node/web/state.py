"""What the web's routers and the application share: the per-process state, the browser's
session, who is asking, and the job-id path type.

A leaf below ``app``, ``api`` and ``pages``, so the application imports its routers at
top level and no router imports the application.
"""

from __future__ import annotations

import logging
import math
import secrets
import threading
import time
from pathlib import Path
from typing import Annotated

from fastapi import HTTPException, Request
from fastapi import Path as PathParameter
from fastapi.templating import Jinja2Templates

from node.context import NodeContext
from node.destination_checks import DestinationCheck, check_destinations
from node.web.auth import (
    CSRF_COOKIE,
    FLASH_COOKIE,
    SESSION_COOKIE,
    Accounts,
    Principal,
    WebSession,
    client_address,
    decode_flash,
    login_csrf,
    login_required,
    throttle_policy,
)
from node.web.logins import LoginStore
from node.web.throttle import LoginThrottle, TooManyAttempts

log = logging.getLogger(__name__)
HERE = Path(__file__).resolve().parent
LOCAL_ADMIN = Principal("local", "admin", "local")
ECHO_CACHE_SECONDS = 10.0
MAX_JOB_ID = 2**31 - 1  # the database's INTEGER
#: A job id in a URL path: anything else is a 422, never a database error.
JobId = Annotated[int, PathParameter(ge=1, le=MAX_JOB_ID)]


class LoginRequired(Exception):
    """Raised by page dependencies; answered with a redirect to the login page."""


class WebState:
    """What the requests of one web process share."""

    def __init__(self, ctx: NodeContext) -> None:
        self.ctx = ctx
        self.login_required = login_required(ctx.settings)
        self.accounts = Accounts(
            ctx.settings.web_users, LoginThrottle(throttle_policy(ctx.settings))
        )
        self.logins = LoginStore(ctx.engine, ctx.settings.web_session_seconds)
        self.templates = Jinja2Templates(directory=HERE / "templates")
        self._echo: tuple[float, list[DestinationCheck]] | None = None
        self._echo_lock = threading.Lock()

    def destination_checks(self) -> list[DestinationCheck]:
        """C-ECHO results at most ``ECHO_CACHE_SECONDS`` old: polling pages stay cheap."""
        with self._echo_lock:
            if self._echo is None or time.monotonic() - self._echo[0] > ECHO_CACHE_SECONDS:
                self._echo = (time.monotonic(), check_destinations(self.ctx))
            return self._echo[1]

    def load_session(self, request: Request) -> WebSession:
        """The browser's login (a database read, only when it sends a login cookie)."""
        token = request.cookies.get(SESSION_COOKIE)
        flash = decode_flash(request.cookies.get(FLASH_COOKIE))
        name = self.logins.user_of(token) if token and self.login_required else None
        principal = self.accounts.login_of(name) if name else None
        if token and principal:
            return WebSession(login_csrf(token), principal, token, flash)
        csrf = request.cookies.get(CSRF_COOKIE) or secrets.token_urlsafe(32)
        session = WebSession(csrf, flash=flash)
        if token:
            session.changed.add(SESSION_COOKIE)  # expired or revoked: clear it
        return session

    def principal(self, request: Request) -> Principal | None:
        """The local admin on 127.0.0.1; else the login's user, HTTP Basic credentials or a
        bearer token."""
        if not self.login_required:
            return LOCAL_ADMIN
        session: WebSession = request.state.session
        if session.principal is not None:
            return session.principal
        header = request.headers.get("authorization")
        if not header:
            return None
        scheme, _, token = header.partition(" ")
        try:
            if scheme.lower() == "bearer":
                return self.accounts.bearer(token.strip(), client_address(request))
            return self.accounts.basic(header, client_address(request))
        except TooManyAttempts as refused:
            raise too_many(refused) from refused


def audit_read(principal: Principal, action: str, job_ids: list[int]) -> None:
    """Who looked at which jobs' patient data: user and job ids only, never the data."""
    log.info(
        "%s: %s of job(s) %s",
        principal.actor,
        action,
        ",".join(map(str, job_ids)) or "none",
        extra={"audit": True, "actor": principal.actor, "action": action, "job_ids": job_ids},
    )


def too_many(refused: TooManyAttempts) -> HTTPException:
    """429 with the seconds to wait: scripts back off, browsers show it."""
    wait = max(1, math.ceil(refused.retry_after))
    return HTTPException(429, str(refused), headers={"Retry-After": str(wait)})


def web_state(request: Request) -> WebState:
    web: WebState = request.app.state.web
    return web


def session_of(request: Request) -> WebSession:
    session: WebSession = request.state.session
    return session


def show_csrf(request: Request) -> str:
    """The CSRF token for a form; an anonymous browser gets it as a cookie too."""
    session = session_of(request)
    if session.token is None and request.cookies.get(CSRF_COOKIE) != session.csrf:
        session.changed.add(CSRF_COOKIE)
    return session.csrf


def start_login(request: Request, principal: Principal) -> None:
    """A fresh login token (never the one the browser came with: no fixation)."""
    session, logins = session_of(request), web_state(request).logins
    if session.token:
        logins.revoke(session.token)
    session.token = logins.create(principal.name)
    session.principal, session.csrf = principal, login_csrf(session.token)
    session.changed.add(SESSION_COOKIE)


def end_login(request: Request) -> None:
    session = session_of(request)
    if session.token:
        web_state(request).logins.revoke(session.token)
    session.token = session.principal = None
    session.changed.add(SESSION_COOKIE)
