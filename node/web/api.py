"""REST API ``/api/v1``: the same views and actions as the CLI, as JSON for scripts.

No ``from __future__ import annotations`` here: the resend route is made per node (its
body lists the configured destinations) and FastAPI must see its real annotations.
"""

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Depends, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field

from node import overview
from node.config import PRIORITY_MAX, PRIORITY_MIN
from node.destinations import AE_TITLE
from node.jobs import JobState
from node.overview import JobDetail, JobSummary, NodeStatus, naive_utc
from node.web.auth import CSRF_HEADER, Principal, check_post
from node.web.state import JobId, WebState, audit_read, web_state


class Problem(BaseModel):
    detail: str


def reader(request: Request, web: Annotated[WebState, Depends(web_state)]) -> Principal:
    principal = web.principal(request)
    if principal is None:
        raise HTTPException(401, "login required", headers={"WWW-Authenticate": "Basic"})
    principal.require_look()
    return principal


def admin(request: Request, principal: Annotated[Principal, Depends(reader)]) -> Principal:
    """An admin, asking from our own origin (with the CSRF token when using a session)."""
    principal.require_admin()
    session = request.state.session if principal.via == "session" else None
    check_post(request, session, request.headers.get(CSRF_HEADER))
    return principal


ERRORS: dict[int | str, dict[str, Any]] = {401: {"model": Problem}, 403: {"model": Problem}}
ACTION_ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"model": Problem, "description": "no such job"},
    409: {"model": Problem, "description": "the job is not in a state that allows this"},
}

_routes = APIRouter(tags=["jobs"])


@_routes.get("/jobs", response_model=list[JobSummary])
def jobs(
    web: Annotated[WebState, Depends(web_state)],
    principal: Annotated[Principal, Depends(reader)],
    state: Annotated[list[JobState] | None, Query(description="repeat for several")] = None,
    since: Annotated[
        str | None,
        Query(description="created at or after", json_schema_extra={"format": "date-time"}),
    ] = None,
    ae: Annotated[str | None, Query(pattern=AE_TITLE.pattern, description="calling AE")] = None,
    study: Annotated[str | None, Query(pattern=r"^[0-9.]{1,64}$")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[JobSummary]:
    """The newest jobs first, filtered."""
    try:  # ISO 8601 only: pydantic would also take a number as a Unix time
        created_since = None if since is None else naive_utc(datetime.fromisoformat(since))
    except (ValueError, OverflowError) as exc:
        problem = {"type": "datetime_parsing", "loc": ("query", "since"), "input": since}
        raise RequestValidationError([{**problem, "msg": "not an ISO 8601 date-time"}]) from exc
    states = None if state is None else [s.value for s in state]
    listed = overview.list_jobs(web.ctx, states, created_since, ae, study, limit)
    audit_read(principal, "list", [job.id for job in listed])
    return listed


@_routes.get("/jobs/{job_id}", response_model=JobDetail, responses={404: {"model": Problem}})
def job(
    job_id: JobId,
    web: Annotated[WebState, Depends(web_state)],
    principal: Annotated[Principal, Depends(reader)],
) -> JobDetail:
    """One job with its timeline and per-destination acknowledgements."""
    try:
        detail = overview.job_detail(web.ctx, job_id)
    except overview.JobNotFound as exc:
        raise HTTPException(404, str(exc)) from exc
    audit_read(principal, "read", [job_id])
    return detail


def _act(
    web: WebState,
    principal: Principal,
    action: overview.Action,
    job_id: int,
    destination: str | None = None,
    priority: int | None = None,
) -> JobSummary:
    try:
        return overview.act(web.ctx, action, job_id, principal.actor, destination, priority)
    except overview.JobNotFound as exc:
        raise HTTPException(404, str(exc)) from exc
    except overview.UnknownDestination as exc:
        raise HTTPException(400, str(exc)) from exc
    except overview.ActionRefused as exc:
        raise HTTPException(409, str(exc)) from exc


@_routes.post("/jobs/{job_id}/retry", response_model=JobSummary, responses=ACTION_ERRORS)
def retry(
    job_id: JobId,
    web: Annotated[WebState, Depends(web_state)],
    principal: Annotated[Principal, Depends(admin)],
) -> JobSummary:
    """Run a finished, failed, skipped or cancelled job again from the start."""
    return _act(web, principal, "retry", job_id)


@_routes.post("/jobs/{job_id}/cancel", response_model=JobSummary, responses=ACTION_ERRORS)
def cancel(
    job_id: JobId,
    web: Annotated[WebState, Depends(web_state)],
    principal: Annotated[Principal, Depends(admin)],
) -> JobSummary:
    """Stop a job that has not finished."""
    return _act(web, principal, "cancel", job_id)


class PriorityRequest(BaseModel):
    priority: int = Field(
        ge=PRIORITY_MIN,
        le=PRIORITY_MAX,
        description="higher first, then oldest; 0 unless a rule says",
    )


@_routes.post(
    "/jobs/{job_id}/priority",
    response_model=JobSummary,
    responses={**ACTION_ERRORS, 400: {"model": Problem, "description": "the body is not JSON"}},
)
def set_priority(
    job_id: JobId,
    request: Annotated[PriorityRequest, Body()],
    web: Annotated[WebState, Depends(web_state)],
    principal: Annotated[Principal, Depends(admin)],
) -> JobSummary:
    """Change the job's priority: workers and senders take higher priority first."""
    return _act(web, principal, "priority", job_id, priority=request.priority)


@_routes.get("/status", response_model=NodeStatus, tags=["node"])
def status(
    web: Annotated[WebState, Depends(web_state)],
    _: Annotated[Principal, Depends(reader)],
) -> NodeStatus:
    """Queue depth, workers, destinations (C-ECHO, cached 10 s) and spool."""
    return overview.node_status(web.ctx, web.destination_checks())


def router(destinations: list[str]) -> APIRouter:
    """The API of a node whose destinations are ``destinations`` (named in the schema)."""
    names = tuple(sorted(destinations))

    class ResendRequest(BaseModel):
        destination: Literal[names] if names else str = Field(  # type: ignore[valid-type]
            description="one of this node's configured destinations"
        )

    api = APIRouter(prefix="/api/v1", responses=ERRORS)
    api.include_router(_routes)

    @api.post(
        "/jobs/{job_id}/resend",
        response_model=JobSummary,
        tags=["jobs"],
        responses={**ACTION_ERRORS, 400: {"model": Problem, "description": "unknown destination"}},
    )
    def resend(
        job_id: JobId,
        request: Annotated[ResendRequest, Body()],
        web: Annotated[WebState, Depends(web_state)],
        principal: Annotated[Principal, Depends(admin)],
    ) -> JobSummary:
        """Send the job's derived series (again) to a configured destination."""
        return _act(web, principal, "resend", job_id, request.destination)

    return api
