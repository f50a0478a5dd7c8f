"""Dashboard pages: the job table, a job's page, previews, and the login form.

Server-rendered Jinja2; ``static/app.js`` re-fetches the ``/partials/...`` fragments
every few seconds, so the pages stay current without a front-end build.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Form, HTTPException, Query, Request
from fastapi.responses import FileResponse, RedirectResponse, Response

from node import overview
from node.forget import forget
from node.jobs import FINAL_STATES, JobState
from node.jobs.states import DeliveryState
from node.web.auth import FLASH_COOKIE, Principal, check_post, client_address
from node.web.preview import WINDOWS, PreviewUnavailable, preview_png
from node.web.state import (
    JobId,
    LoginRequired,
    WebState,
    audit_read,
    end_login,
    session_of,
    show_csrf,
    start_login,
    web_state,
)
from node.web.throttle import TooManyAttempts

router = APIRouter(include_in_schema=False)
StateFilter = Annotated[JobState | None, Query()]
PAGE_SIZE = 200
#: Delivery states in which the destination holds the derived series (a viewer can show it).
HELD = frozenset({DeliveryState.ACKNOWLEDGED, DeliveryState.COMMITTED})


def viewer(request: Request, web: Annotated[WebState, Depends(web_state)]) -> Principal:
    principal = web.principal(request)
    if principal is None:
        raise LoginRequired()
    principal.require_look()
    return principal


def _page(request: Request, template: str, principal: Principal | None, **context: Any) -> Response:
    """Render with what every page needs: who, the CSRF token, messages to show once."""
    web, session = web_state(request), session_of(request)
    flash = session.flash
    if flash:
        session.flash = []
        session.changed.add(FLASH_COOKIE)
    return web.templates.TemplateResponse(
        request,
        template,
        {
            "principal": principal,
            "login_required": web.login_required,
            "csrf": show_csrf(request),
            "flash": flash,
            "node_name": web.ctx.settings.ae_title,
            "format_time": overview.format_time,
            "format_age": overview.format_age,
            "format_bytes": overview.format_bytes,
            **context,
        },
    )


def _dashboard(web: WebState, state: JobState | None) -> dict[str, Any]:
    return {
        "status": overview.node_status(web.ctx, web.destination_checks()),
        "jobs": overview.list_jobs(web.ctx, [state] if state else None, limit=PAGE_SIZE),
        "state": state,
        "states": list(JobState),
    }


@router.get("/")
def dashboard(
    request: Request,
    web: Annotated[WebState, Depends(web_state)],
    principal: Annotated[Principal, Depends(viewer)],
    state: StateFilter = None,
) -> Response:
    return _page(request, "dashboard.html", principal, **_dashboard(web, state))


@router.get("/partials/dashboard")
def dashboard_live(
    request: Request,
    web: Annotated[WebState, Depends(web_state)],
    principal: Annotated[Principal, Depends(viewer)],
    state: StateFilter = None,
) -> Response:
    return _page(request, "_dashboard_live.html", principal, **_dashboard(web, state))


def _job(web: WebState, job_id: int) -> dict[str, Any]:
    try:
        job = overview.job_detail(web.ctx, job_id)
    except overview.JobNotFound as exc:
        raise HTTPException(404, str(exc)) from exc
    return {
        "job": job,
        "final": job.state in FINAL_STATES,
        "windows": WINDOWS,
        "destinations": sorted(web.ctx.settings.destinations),
        "viewers": _viewer_links(web, job),
    }


def _viewer_links(web: WebState, job: overview.JobDetail) -> dict[str, str]:
    """The derived series in the viewer of each destination that holds it and has one."""
    links = {}
    for delivery in job.delivery:
        destination = web.ctx.settings.destinations.get(delivery.destination)
        if destination is None or job.output_series_uid is None or delivery.state not in HELD:
            continue
        link = destination.viewer_link(job.study_instance_uid, job.output_series_uid)
        if link is not None:
            links[delivery.destination] = link
    return links


@router.get("/jobs/{job_id}")
def job_page(
    request: Request,
    job_id: JobId,
    web: Annotated[WebState, Depends(web_state)],
    principal: Annotated[Principal, Depends(viewer)],
) -> Response:
    return _page(request, "job.html", principal, **_job(web, job_id))


@router.get("/partials/jobs/{job_id}")
def job_live(
    request: Request,
    job_id: JobId,
    web: Annotated[WebState, Depends(web_state)],
    principal: Annotated[Principal, Depends(viewer)],
) -> Response:
    return _page(request, "_job_live.html", principal, **_job(web, job_id))


@router.get("/jobs/{job_id}/preview/{kind}.png")
def preview(
    job_id: JobId,
    kind: Literal["soft", "lung", "diff"],
    web: Annotated[WebState, Depends(web_state)],
    principal: Annotated[Principal, Depends(viewer)],
) -> Response:
    try:
        path = preview_png(web.ctx, job_id, kind)
    except (PreviewUnavailable, overview.JobNotFound) as exc:
        raise HTTPException(404, str(exc)) from exc
    audit_read(principal, f"preview {kind}", [job_id])
    return FileResponse(path, media_type="image/png", headers={"Cache-Control": "no-cache"})


@router.post("/jobs/{job_id}/forget")
def job_forget(
    request: Request,
    job_id: JobId,
    web: Annotated[WebState, Depends(web_state)],
    principal: Annotated[Principal, Depends(viewer)],
    csrf_token: Annotated[str, Form()] = "",
) -> Response:
    """Forget a finished job and its series, so the scanner's resend starts clean."""
    session = session_of(request)
    check_post(request, session, csrf_token)
    principal.require_admin()
    try:
        forgotten = forget(web.ctx, job_id, principal.actor)
    except overview.JobNotFound as exc:
        raise HTTPException(404, str(exc)) from exc
    except overview.ActionRefused as exc:
        session.say("error", str(exc))
        return RedirectResponse(request.url_for("job_page", job_id=job_id), status_code=303)
    files = len(forgotten.spool_paths)
    session.say("ok", f"job {job_id} forgotten ({files} spool files): the series may be resent")
    return RedirectResponse(request.url_for("dashboard"), status_code=303)


@router.post("/jobs/{job_id}/{action}")
def job_action(
    request: Request,
    job_id: JobId,
    action: overview.Action,
    web: Annotated[WebState, Depends(web_state)],
    principal: Annotated[Principal, Depends(viewer)],
    csrf_token: Annotated[str, Form()] = "",
    destination: Annotated[str | None, Form()] = None,
    priority: Annotated[int | None, Form()] = None,
) -> Response:
    """A button on the job page: act, then show the job again with what happened."""
    session = session_of(request)
    check_post(request, session, csrf_token)
    principal.require_admin()
    try:
        job = overview.act(web.ctx, action, job_id, principal.actor, destination, priority)
        session.say("ok", f"{action}: job {job_id} is now {job.state}")
    except overview.JobNotFound as exc:
        raise HTTPException(404, str(exc)) from exc
    except overview.ActionRefused as exc:
        session.say("error", str(exc))
    return RedirectResponse(request.url_for("job_page", job_id=job_id), status_code=303)


def _local(target: str) -> str:
    """Only a path on this site may follow a login: no open redirect."""
    return target if target.startswith("/") and not target.startswith(("//", "/\\")) else "/"


@router.get("/login")
def login_page(request: Request, next: str = "/") -> Response:
    web = web_state(request)
    if not web.login_required:
        return RedirectResponse("/", status_code=303)
    return _page(
        request,
        "login.html",
        None,
        next=_local(next),
        no_users=not web.ctx.settings.web_users,
    )


@router.post("/login")
def login(
    request: Request,
    username: Annotated[str, Form(max_length=64)],
    password: Annotated[str, Form(max_length=1024)],
    csrf_token: Annotated[str, Form()] = "",
    next: Annotated[str, Form()] = "/",
) -> Response:
    web, session = web_state(request), session_of(request)
    check_post(request, session, csrf_token)
    try:
        principal = web.accounts.authenticate(username, password, client_address(request))
    except TooManyAttempts as refused:
        wait = max(1, math.ceil(refused.retry_after))
        session.say("error", f"too many failed logins: try again in {wait} s")
        return RedirectResponse(request.url_for("login_page"), status_code=303)
    if principal is None:
        session.say("error", "unknown user or wrong password")
        return RedirectResponse(request.url_for("login_page"), status_code=303)
    if not principal.may_look:
        session.say("error", f"{principal.name} may only store instances (STOW-RS), not log in")
        return RedirectResponse(request.url_for("login_page"), status_code=303)
    start_login(request, principal)
    return RedirectResponse(_local(next), status_code=303)


@router.post("/logout")
def logout(request: Request, csrf_token: Annotated[str, Form()] = "") -> Response:
    check_post(request, session_of(request), csrf_token)
    end_login(request)
    return RedirectResponse(request.url_for("login_page"), status_code=303)
