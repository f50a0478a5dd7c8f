"""What an administrator sees and does: job views, node status and the steering actions.

The CLI (``node.admin``), the REST API and the dashboard (``node.web``) all read and
steer through these functions, so the three always agree.  Every write goes through
the jobs manager; each admin action is also logged with its actor (the audit log),
and the manager writes it to the job's timeline.
"""

from __future__ import annotations

import logging
import shutil
from datetime import UTC, datetime, timedelta
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict

from node import __version__
from node.config import PRIORITY_MAX, PRIORITY_MIN
from node.context import NodeContext
from node.db import utcnow
from node.destination_checks import DestinationCheck, check_destinations
from node.jobs import JobState, TransitionError, records
from node.jobs.states import DeliveryState, EventKind

log = logging.getLogger(__name__)

Action = Literal["retry", "cancel", "resend", "priority"]


class JobNotFound(LookupError):
    """No job has this id."""


class ActionRefused(ValueError):
    """The action cannot be done on this job now; the message says why and what to do."""


class UnknownDestination(ActionRefused):
    """A resend named a destination that is not configured."""


def _as_utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def naive_utc(value: datetime) -> datetime:
    """A time as the job table stores it: UTC without tzinfo (naive input is UTC already)."""
    return value.astimezone(UTC).replace(tzinfo=None) if value.tzinfo else value


#: The job table stores naive UTC; views say so, and JSON gets RFC 3339 with ``Z``.
UtcDatetime = Annotated[datetime, AfterValidator(_as_utc)]


class _View(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class JobSummary(_View):
    """A row of the job table as the admin sees it."""

    id: int
    state: JobState
    priority: int
    series_instance_uid: str
    study_instance_uid: str
    calling_ae_title: str
    rule: str
    strength: float
    destinations: list[str]
    instance_count: int
    denoised_count: int
    attempts: int
    max_attempts: int
    reason: str | None
    last_error: str | None
    claimed_by: str | None
    model_name: str | None
    model_version: str | None
    output_series_uid: str | None
    #: the series' noise in flat soft tissue (HU), before and after; see ``noise_report``
    noise_before_hu: float | None
    noise_after_hu: float | None
    #: measurable slices behind the figure: 0 when none was, None when not measured
    noise_slices: int | None
    noise_drop: float | None
    noise_report: str
    created_at: UtcDatetime
    updated_at: UtcDatetime
    started_at: UtcDatetime | None
    finished_at: UtcDatetime | None


class JobEventView(_View):
    at: UtcDatetime
    kind: EventKind
    from_state: JobState | None
    to_state: JobState | None
    actor: str
    message: str


class DeliveryView(_View):
    """Where the job stands with one destination, and why when it failed."""

    destination: str
    state: DeliveryState
    attempts: int
    reason: str | None


class JobDetail(JobSummary):
    """A job with its timeline and what each destination acknowledged."""

    received_count: int
    sent: dict[str, int]
    delivery: list[DeliveryView]
    events: list[JobEventView]


class WorkerView(_View):
    name: str
    roles: str
    hostname: str
    pid: int
    provider: str | None
    started_at: UtcDatetime
    heartbeat_at: UtcDatetime
    stopped_at: UtcDatetime | None
    alive: bool


class SpoolView(BaseModel):
    path: str
    free_bytes: int
    total_bytes: int
    min_free_bytes: int


class HousekeepingSummary(_View):
    """What the spool's housekeeping (or ``denoise-node purge``) last did."""

    at: UtcDatetime
    actor: str
    jobs: int
    files: int
    orphan_files: int
    bytes: int


class NodeStatus(BaseModel):
    """Everything ``denoise-node status`` and the dashboard header show."""

    version: str
    database: str
    states: dict[JobState, int]
    oldest_queued_seconds: float | None
    workers: list[WorkerView]
    destinations: list[DestinationCheck]
    spool: SpoolView
    housekeeping: HousekeepingSummary | None
    #: destination name → delivery state → jobs (``committed`` where commitment is asked)
    deliveries: dict[str, dict[str, int]]


# -- reading -----------------------------------------------------------------------------


def list_jobs(
    ctx: NodeContext,
    states: list[str] | None = None,
    since: datetime | None = None,
    calling_ae_title: str | None = None,
    study_instance_uid: str | None = None,
    limit: int = 100,
) -> list[JobSummary]:
    jobs = ctx.queries.list_jobs(states, since, calling_ae_title, study_instance_uid, limit)
    return [JobSummary.model_validate(job) for job in jobs]


def _job(ctx: NodeContext, job_id: int) -> records.JobView:
    try:
        return ctx.queries.get_job(job_id)
    except TransitionError as exc:
        raise JobNotFound(f"job {job_id} does not exist") from exc


def job_detail(ctx: NodeContext, job_id: int) -> JobDetail:
    job = _job(ctx, job_id)
    sent = {name: 0 for name in job.destinations} | ctx.queries.delivery_counts(job_id)
    events: list[records.EventView] = ctx.queries.job_events(job_id)
    return JobDetail.model_validate(
        {
            **JobSummary.model_validate(job).model_dump(),
            "received_count": len(ctx.queries.series_instances(job.series_instance_uid)),
            "sent": sent,
            "delivery": [DeliveryView.model_validate(d) for d in ctx.queries.destinations(job_id)],
            "events": [JobEventView.model_validate(event) for event in events],
        }
    )


def worker_views(ctx: NodeContext) -> list[WorkerView]:
    """Known node processes; ``alive`` when running and heard from within the stale limit."""
    cutoff = utcnow() - timedelta(seconds=ctx.settings.stale_after_seconds)
    workers: list[records.WorkerView] = ctx.registry.workers()
    return [
        WorkerView.model_validate(
            {
                **{key: getattr(worker, key) for key in WorkerView.model_fields if key != "alive"},
                "alive": worker.stopped_at is None and worker.heartbeat_at >= cutoff,
            }
        )
        for worker in workers
    ]


def spool_view(ctx: NodeContext) -> SpoolView:
    usage = shutil.disk_usage(ctx.spool.root)
    return SpoolView(
        path=str(ctx.spool.root),
        free_bytes=usage.free,
        total_bytes=usage.total,
        min_free_bytes=ctx.spool.min_free_bytes,
    )


def queue_age_seconds(ctx: NodeContext) -> float | None:
    oldest = ctx.queries.oldest_queued_at()
    return None if oldest is None else max(0.0, (utcnow() - oldest).total_seconds())


def node_status(ctx: NodeContext, destinations: list[DestinationCheck] | None = None) -> NodeStatus:
    """The node at a glance; ``destinations`` lets a caller reuse recent C-ECHO results."""
    counts = ctx.queries.state_counts()
    return NodeStatus(
        version=__version__,
        database=ctx.engine.url.get_backend_name(),
        states={state: counts.get(state, 0) for state in JobState},
        oldest_queued_seconds=queue_age_seconds(ctx),
        workers=worker_views(ctx),
        destinations=check_destinations(ctx) if destinations is None else destinations,
        spool=spool_view(ctx),
        housekeeping=_housekeeping(ctx),
        deliveries=_deliveries(ctx),
    )


def _deliveries(ctx: NodeContext) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for (name, state), count in sorted(ctx.queries.destination_state_counts().items()):
        counts.setdefault(name, {})[state] = count
    return counts


def _housekeeping(ctx: NodeContext) -> HousekeepingSummary | None:
    run = ctx.queries.last_housekeeping()
    return None if run is None else HousekeepingSummary.model_validate(run)


# -- steering ----------------------------------------------------------------------------


def _require_files(ctx: NodeContext, paths: list[str], what: str, job_id: int) -> None:
    missing = [path for path in paths if not ctx.spool.path(path).is_file()]
    if missing or not paths:
        raise ActionRefused(
            f"job {job_id}: {len(missing)} of {len(paths)} {what} files are no longer in the "
            "spool (purged after the retention period?): send the series to the node again"
        )


def act(
    ctx: NodeContext,
    action: Action,
    job_id: int,
    actor: str,
    destination: str | None = None,
    priority: int | None = None,
) -> JobSummary:
    """Retry, cancel, resend or reprioritise a job for ``actor``; logged as an audit line.

    Raises JobNotFound, or ActionRefused with a message an administrator can act on.
    """
    job = _job(ctx, job_id)
    manager = ctx.manager
    try:
        if action == "retry":
            sources = [i.spool_path for i in ctx.queries.series_instances(job.series_instance_uid)]
            _require_files(ctx, sources, "received", job_id)
            manager.retry_job(job_id, actor)
        elif action == "cancel":
            manager.cancel_job(job_id, actor)
        elif action == "priority":
            if priority is None or not PRIORITY_MIN <= priority <= PRIORITY_MAX:
                raise ActionRefused(
                    f"job {job_id}: a priority is an integer from {PRIORITY_MIN} to {PRIORITY_MAX}"
                )
            manager.set_priority(job_id, priority, actor)
        else:
            if destination not in ctx.settings.destinations:
                known = ", ".join(sorted(ctx.settings.destinations)) or "none"
                raise UnknownDestination(
                    f"unknown destination {destination!r}; configured destinations: {known}"
                )
            if job.output_series_uid is None:
                raise ActionRefused(f"job {job_id} has no derived series to send; retry it instead")
            derived = [d.spool_path for d in ctx.queries.derived_instances(job_id)]
            _require_files(ctx, derived, "derived", job_id)
            manager.resend_job(job_id, destination, actor)
    except TransitionError as exc:
        raise ActionRefused(f"cannot {action} job {job_id}: {exc}") from exc
    log.info(
        "admin action %s on job %s by %s",
        action,
        job_id,
        actor,
        extra={"audit": True, "actor": actor, "action": action, "job_id": job_id}
        | ({"destination": destination} if destination else {})
        | ({"priority": priority} if action == "priority" else {}),
    )
    return JobSummary.model_validate(ctx.queries.get_job(job_id))


# -- presenting --------------------------------------------------------------------------


def format_time(value: datetime | None) -> str:
    """UTC to the second, the way the CLI and the dashboard both show times."""
    return "-" if value is None else f"{value:%Y-%m-%d %H:%M:%S}Z"


def format_age(seconds: float | None) -> str:
    """``95`` → ``1m35s``: short enough for a table cell."""
    if seconds is None:
        return "-"
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def format_bytes(count: int) -> str:
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.1f} {unit}" if unit != "B" else f"{count} B"
        size /= 1024
    return f"{size:.1f} TiB"
