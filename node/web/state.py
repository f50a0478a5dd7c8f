"""What the web's routers and the application share: the per-process state, the browser's
session, who is asking, and the job-id path type.

A leaf below ``app``, ``api`` and ``pages``, so the application imports its routers at
top level and no router imports the application.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from pathlib import Path
from typing import Annotated

from fastapi import HTTPException, Request
from fastapi import Path as PathParameter
from fastapi.templating import Jinja2Templates

from node import overview
from node.context import NodeContext
from node.overview import DestinationCheck
from node.web.auth import (
    Accounts,
    Principal,
    Sessions,
    WebSession,
    client_address,
    login_required,
    throttle_policy,
)
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
        self.sessions = Sessions()
        self.templates = Jinja2Templates(directory=HERE / "templates")
        self._echo: tuple[float, list[DestinationCheck]] | None = None
        self._echo_lock = threading.Lock()

    def destination_checks(self) -> list[DestinationCheck]:
        """C-ECHO results at most ``ECHO_CACHE_SECONDS`` old: polling pages stay cheap."""
        with self._echo_lock:
            if self._echo is None or time.monotonic() - self._echo[0] > ECHO_CACHE_SECONDS:
                self._echo = (time.monotonic(), overview.check_destinations(self.ctx))
            return self._echo[1]

    def principal(self, request: Request) -> Principal | None:
        """The local admin on 127.0.0.1; else the session's user or HTTP Basic credentials."""
        if not self.login_required:
            return LOCAL_ADMIN
        session: WebSession | None = request.state.session
        if session is not None and session.principal is not None:
            return session.principal
        header = request.headers.get("authorization")
        if not header:
            return None
        try:
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


def ensure_session(request: Request, principal: Principal | None = None) -> WebSession:
    """The browser's session, made (and its cookie set) on first need."""
    session: WebSession | None = request.state.session
    if session is None or principal is not None:
        if session is not None:
            web_state(request).sessions.drop(session.token)  # a login gets a fresh token
        session = web_state(request).sessions.new(principal)
        request.state.session = request.state.new_session = session
    return session
