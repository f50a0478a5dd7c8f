"""Dashboard pages: the job table, a job's page, previews, and the login form.

Server-rendered Jinja2; ``static/app.js`` re-fetches the ``/partials/...`` fragments
every few seconds, so the pages stay current without a front-end build.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Form, HTTPException, Query, Request
from fastapi.responses import FileResponse, RedirectResponse, Response

from node import overview
from node.jobs import FINAL_STATES, JobState
from node.web.auth import SESSION_COOKIE, Principal, check_post
from node.web.preview import WINDOWS, PreviewUnavailable, preview_png
from node.web.state import JobId, LoginRequired, WebState, ensure_session, web_state

router = APIRouter(include_in_schema=False)
StateFilter = Annotated[JobState | None, Query()]
PAGE_SIZE = 200


def viewer(request: Request, web: Annotated[WebState, Depends(web_state)]) -> Principal:
    principal = web.principal(request)
    if principal is None:
        raise LoginRequired()
    return principal


def _page(request: Request, template: str, principal: Principal | None, **context: Any) -> Response:
    """Render with what every page needs: who, the CSRF token, messages to show once."""
    web = web_state(request)
    session = ensure_session(request)
    flash, session.flash = session.flash, []
    return web.templates.TemplateResponse(
        request,
        template,
        {
            "principal": principal,
            "login_required": web.login_required,
            "csrf": session.csrf,
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
    }


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
    _: Annotated[Principal, Depends(viewer)],
) -> Response:
    try:
        path = preview_png(web.ctx, job_id, kind)
    except (PreviewUnavailable, overview.JobNotFound) as exc:
        raise HTTPException(404, str(exc)) from exc
    return FileResponse(path, media_type="image/png", headers={"Cache-Control": "no-cache"})


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
    session = ensure_session(request)
    check_post(request, session, csrf_token)
    principal.require_admin()
    try:
        job = overview.act(web.ctx, action, job_id, principal.actor, destination, priority)
        session.flash.append(("ok", f"{action}: job {job_id} is now {job.state}"))
    except overview.JobNotFound as exc:
        raise HTTPException(404, str(exc)) from exc
    except overview.ActionRefused as exc:
        session.flash.append(("error", str(exc)))
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
    web, session = web_state(request), ensure_session(request)
    check_post(request, session, csrf_token)
    principal = web.accounts.authenticate(username, password)
    if principal is None:
        session.flash.append(("error", "unknown user or wrong password"))
        return RedirectResponse(request.url_for("login_page"), status_code=303)
    ensure_session(request, principal)
    return RedirectResponse(_local(next), status_code=303)


@router.post("/logout")
def logout(request: Request, csrf_token: Annotated[str, Form()] = "") -> Response:
    session = ensure_session(request)
    check_post(request, session, csrf_token)
    web_state(request).sessions.drop(session.token)
    response = RedirectResponse(request.url_for("login_page"), status_code=303)
    response.delete_cookie(SESSION_COOKIE)
    return response
