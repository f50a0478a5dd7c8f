"""Admin sub-commands of ``denoise-node``: look at and steer the job table from a terminal.

``jobs list|show|retry|cancel|resend|priority``, ``status``, ``purge`` and ``web hash-password``.
Tables fit 100 columns; ``--json`` prints the same data as the REST API for scripts.
Exit codes: 0 done, 1 refused (unknown job, impossible action, unreachable destination).
"""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import socket
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import BaseModel

from node import housekeeping, overview
from node.config import load_settings
from node.context import NodeContext
from node.db import utcnow
from node.destination_checks import DestinationCheck
from node.forget import add_forget_command
from node.jobs import JobState
from node.logs import configure_logging
from node.overview import (
    ActionRefused,
    JobNotFound,
    format_age,
    format_bytes,
    format_time,
    naive_utc,
)

log = logging.getLogger(__name__)

WIDTH = 100
UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_since(text: str) -> datetime:
    """``30m``, ``2h``, ``7d``, ``1w`` ago, or an ISO date/time (UTC unless it says otherwise)."""
    unit = UNITS.get(text[-1:].lower())
    try:
        if unit and text[:-1].replace(".", "", 1).isdigit():
            return utcnow() - timedelta(**{unit: float(text[:-1])})
        return naive_utc(datetime.fromisoformat(text))
    except (ValueError, OverflowError) as exc:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither an age like 30m, 2h, 7d nor an ISO date/time"
        ) from exc


def cli_actor() -> str:
    """Who acts from this terminal, for the audit log and the job timeline."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"cli:{user}@{socket.gethostname()}"


@contextmanager
def _context(args: argparse.Namespace) -> Iterator[NodeContext]:
    settings = load_settings(args.config)
    configure_logging(args.log_level or settings.log_level, args.log_format or settings.log_format)
    ctx = NodeContext.open(settings)
    try:
        yield ctx
    finally:
        ctx.close()


def _print_json(value: BaseModel | Sequence[BaseModel] | dict[str, Any]) -> None:
    data: Any
    if isinstance(value, BaseModel):
        data = value.model_dump(mode="json")
    elif isinstance(value, dict):
        data = value
    else:
        data = [item.model_dump(mode="json") for item in value]
    print(json.dumps(data, indent=2))


def _cell(value: str, width: int) -> str:
    return value if len(value) <= width else value[: width - 1] + "…"


def _table(headers: Sequence[str], widths: Sequence[int], rows: Sequence[Sequence[str]]) -> str:
    """Fixed-width columns; the last one takes what is left of ``WIDTH``."""
    widths = [*widths, WIDTH - sum(widths) - len(widths)]
    lines = [[*headers], *rows]
    return "\n".join(
        " ".join(_cell(str(v), w).ljust(w) for v, w in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def _tail(uid: str, width: int) -> str:
    """The end of a UID: where series of one study differ."""
    return uid if len(uid) <= width else "…" + uid[-(width - 1) :]


# -- jobs --------------------------------------------------------------------------------


def cmd_jobs_list(args: argparse.Namespace) -> int:
    with _context(args) as ctx:
        jobs = overview.list_jobs(ctx, args.state, args.since, args.ae, args.study, args.limit)
    if args.json:
        _print_json(jobs)
        return 0
    rows = [
        (
            str(job.id),
            job.state,
            str(job.priority),
            f"{job.created_at:%m-%d %H:%M:%S}",
            job.calling_ae_title,
            f"{job.denoised_count}/{job.instance_count}",
            _tail(job.series_instance_uid, 9),
            job.last_error or job.reason or f"attempt {job.attempts}/{job.max_attempts}",
        )
        for job in jobs
    ]
    headers = ("ID", "STATE", "PRIO", "CREATED (UTC)", "AE", "SLICES", "SERIES", "NOTE")
    print(_table(headers, (5, 9, 4, 14, 16, 7, 9), rows) if rows else "no jobs")
    return 0


def _show(job: overview.JobDetail) -> str:
    sent = ", ".join(f"{name} {count}/{job.denoised_count}" for name, count in job.sent.items())
    lines = [
        f"Job {job.id}  {job.state}  priority {job.priority}  rule {job.rule!r}, "
        f"strength {job.strength:g}",
        f"Series     {job.series_instance_uid}",
        f"Study      {job.study_instance_uid}",
        f"From       {job.calling_ae_title}",
        f"Created    {format_time(job.created_at)}   started {format_time(job.started_at)}"
        f"   finished {format_time(job.finished_at)}",
        f"Attempts   {job.attempts} of {job.max_attempts}"
        + (f"   held by {job.claimed_by}" if job.claimed_by else ""),
        f"Instances  received {job.received_count} (settled {job.instance_count}), "
        f"denoised {job.denoised_count}, sent {sent or '-'}",
    ]
    for delivery in job.delivery:
        why = f": {delivery.reason}" if delivery.reason else ""
        lines.append(f"Delivery   {delivery.destination} {delivery.state}{why}")
    if job.model_name:
        lines.append(f"Model      {job.model_name} {job.model_version}")
    if job.output_series_uid:
        lines.append(f"Output     {job.output_series_uid}")
    lines.append(f"Noise      {job.noise_report}")
    if job.reason:
        lines.append(f"Reason     {job.reason}")
    if job.last_error:
        lines.append(f"Error      {job.last_error}")
    lines.append("Timeline")
    for event in job.events:
        change = f"→ {event.to_state}" if event.to_state else ""
        lines.append(
            f"  {format_time(event.at)}  {event.kind:14} {_cell(event.actor, 22):22} {change:11}"
            f" {event.message}"
        )
    return "\n".join(lines)


def cmd_jobs_show(args: argparse.Namespace) -> int:
    with _context(args) as ctx:
        detail = overview.job_detail(ctx, args.id)
    if args.json:
        _print_json(detail)
    else:
        print(_show(detail))
    return 0


def _action(action: overview.Action) -> Callable[[argparse.Namespace], int]:
    def command(args: argparse.Namespace) -> int:
        with _context(args) as ctx:
            job = overview.act(
                ctx, action, args.id, cli_actor(), getattr(args, "to", None), args.priority
            )
        if args.json:
            _print_json(job)
        else:
            extra = f", priority {job.priority}" if action == "priority" else ""
            print(f"job {job.id}: {action} done, now {job.state}{extra}")
        return 0

    return command


# -- status ------------------------------------------------------------------------------


def _status_text(status: overview.NodeStatus) -> str:
    counts = "  ".join(f"{state} {count}" for state, count in status.states.items())
    lines = [
        f"denoise-node {status.version} on {status.database}",
        f"Jobs          {counts}",
        f"Oldest queued {format_age(status.oldest_queued_seconds)}",
        "Workers",
    ]
    now = datetime.now(UTC)
    rows = [
        (
            f"  {worker.name}",
            worker.roles,
            "alive" if worker.alive else "silent",
            format_age((now - worker.heartbeat_at).total_seconds()) + " ago",
            worker.provider or "-",
        )
        for worker in status.workers
        if worker.stopped_at is None
    ]
    headers = ("  NAME", "ROLES", "STATE", "HEARTBEAT", "PROVIDER")
    lines.append(_table(headers, (30, 22, 8, 12), rows) if rows else "  none running")
    lines.append("Destinations")
    for check in status.destinations:
        mark = "ok  " if check.reachable else "FAIL"
        address = check.url or f"{check.ae_title}@{check.host}:{check.port}"
        lines.append(f"  {mark} {check.name}: {address}  {check.detail}")
        lines.append(_deliveries_text(status.deliveries.get(check.name, {}), check))
    if not status.destinations:
        lines.append("  none configured")
    spool = status.spool
    lines.append(
        f"Spool         {spool.path}: {format_bytes(spool.free_bytes)} free of "
        f"{format_bytes(spool.total_bytes)} (refuses below {format_bytes(spool.min_free_bytes)})"
    )
    lines.append(f"Housekeeping  {_housekeeping_text(status.housekeeping)}")
    return "\n".join(lines)


def _deliveries_text(counts: dict[str, int], check: DestinationCheck) -> str:
    """Jobs per delivery state; where commitment is asked, ``acknowledged`` ones await it."""
    text = "  ".join(f"{state} {count}" for state, count in counts.items()) or "no jobs yet"
    asked = "storage commitment asked" if check.storage_commitment else "no storage commitment"
    return f"       jobs: {text} ({asked})"


def _housekeeping_text(run: overview.HousekeepingSummary | None) -> str:
    if run is None:
        return "never ran"
    return (
        f"{format_time(run.at)} by {run.actor}: {run.jobs} jobs purged, {run.files} files "
        f"({run.orphan_files} orphaned), {format_bytes(run.bytes)} freed"
    )


def cmd_status(args: argparse.Namespace) -> int:
    """Exit 1 when a destination does not answer C-ECHO, so monitoring can alert on it."""
    with _context(args) as ctx:
        logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)  # the table says it
        status = overview.node_status(ctx)
    if args.json:
        _print_json(status)
    else:
        print(_status_text(status))
    return 0 if all(check.reachable for check in status.destinations) else 1


# -- purge -------------------------------------------------------------------------------


def cmd_purge(args: argparse.Namespace) -> int:
    with _context(args) as ctx:
        report = housekeeping.purge_spool(ctx, args.older_than, cli_actor(), args.dry_run)
    if args.json:
        _print_json(asdict(report))
        return 0
    verb = "would remove" if args.dry_run else "removed"
    print(
        f"{len(report.jobs)} finished jobs older than {args.older_than:g} days: {verb} "
        f"{report.derived_files} derived and {report.received_files} received files, "
        f"{report.orphan_files} orphaned files ({format_bytes(report.bytes)})"
    )
    return 0


# -- web ---------------------------------------------------------------------------------


def cmd_hash_password(args: argparse.Namespace) -> int:
    """Print a password hash for ``web_users``; the password never appears in argv."""
    from node.web.auth import hash_password

    if sys.stdin.isatty():
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            print("denoise-node: the passwords differ", file=sys.stderr)
            return 1
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if len(password) < 8:
        print("denoise-node: use at least 8 characters", file=sys.stderr)
        return 1
    print(hash_password(password))
    return 0


# -- wiring ------------------------------------------------------------------------------


def _refusals(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Unknown jobs and refused actions end with a one-line message and exit code 1."""

    def guarded(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except (JobNotFound, ActionRefused) as exc:
            print(f"denoise-node: {exc}", file=sys.stderr)
            return 1

    return guarded


def _at_least(minimum: float, kind: type[int] | type[float]) -> Callable[[str], float]:
    def parse(text: str) -> float:
        value = kind(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}")
        return value

    return parse


def _json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON (as the REST API)")


def _states(text: str) -> list[str]:
    states = [part.strip() for part in text.split(",") if part.strip()]
    unknown = sorted(set(states) - set(JobState))
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown state(s) {', '.join(unknown)}; choose from {', '.join(JobState)}"
        )
    return states


def _add_actions(verbs: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``jobs retry|cancel|resend|priority``: the verbs that change a job."""
    actions: tuple[tuple[overview.Action, str], ...] = (
        ("retry", "run a finished, failed, skipped or cancelled job again"),
        ("cancel", "stop a job that has not finished"),
        ("resend", "send a job's derived series (again) to a destination"),
        ("priority", "set a job's priority: higher first, then oldest"),
    )
    for action, text in actions:
        verb = verbs.add_parser(action, help=text)
        verb.add_argument("id", type=int)
        if action == "resend":
            verb.add_argument("--to", required=True, metavar="DEST", help="destination name")
        verb.set_defaults(priority=None)
        if action == "priority":
            verb.add_argument("priority", type=int, help="the new priority (default of jobs: 0)")
        _json_flag(verb)
        verb.set_defaults(func=_refusals(_action(action)))


def add_admin_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``jobs``, ``status``, ``purge`` and ``web`` to ``denoise-node``'s sub-commands."""
    jobs = subparsers.add_parser(
        "jobs", help="list, show, retry, cancel, resend, reprioritise or forget jobs"
    )
    verbs = jobs.add_subparsers(dest="jobs_command", required=True, metavar="ACTION")

    listing = verbs.add_parser("list", help="the newest jobs, filtered")
    listing.add_argument("--state", type=_states, help="comma-separated states, e.g. failed")
    listing.add_argument("--since", type=parse_since, help="created since: 2h, 7d or ISO time")
    listing.add_argument("--ae", help="calling AE title of the sender")
    listing.add_argument("--study", help="Study Instance UID")
    listing.add_argument(
        "--limit", type=_at_least(1, int), default=50, help="at most this many (50)"
    )
    _json_flag(listing)
    listing.set_defaults(func=_refusals(cmd_jobs_list))
    show = verbs.add_parser("show", help="one job: timeline, counts, error")
    show.add_argument("id", type=int)
    _json_flag(show)
    show.set_defaults(func=_refusals(cmd_jobs_show))

    _add_actions(verbs)
    add_forget_command(verbs, _context, cli_actor, _refusals)

    status = subparsers.add_parser(
        "status", help="queue, workers, destinations (C-ECHO) and spool at a glance"
    )
    _json_flag(status)
    status.set_defaults(func=cmd_status)

    purge = subparsers.add_parser("purge", help="remove spool files of long-finished jobs")
    purge.add_argument(
        "--older-than",
        type=_at_least(0, float),
        required=True,
        metavar="DAYS",
        help="retention in days",
    )
    purge.add_argument("--dry-run", action="store_true", help="only say what would go")
    _json_flag(purge)
    purge.set_defaults(func=cmd_purge)

    web = subparsers.add_parser("web", help="dashboard helpers")
    web_commands = web.add_subparsers(dest="web_command", required=True, metavar="ACTION")
    hashing = web_commands.add_parser(
        "hash-password", help="hash a password for web_users (reads it from the terminal or stdin)"
    )
    hashing.set_defaults(func=cmd_hash_password)
