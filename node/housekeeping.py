"""Housekeeping: the spool keeps only what a job may still need.

Spool files of final jobs go after ``retention_days``; when the spool's disk is fuller
than ``spool_high_water_percent``, final jobs go earlier, oldest first, until it is not.
Never files of unfinished jobs, nor of a job whose storage commitment request is still
awaited (within the destination's commitment timeout).  A job's derived folder goes
whole, recorded files or not (a job that failed mid-way never recorded the files it
wrote); any other file no row names goes once it is older than ``orphan_grace_seconds``,
or ``unrecorded_grace_seconds`` after a job-table error kept it (``node.unrecorded``).
Each job's purge is a ``purged`` event in its timeline; the run's totals are kept for
``status``.
"""

from __future__ import annotations

import logging
import shutil
import time
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from node import unrecorded
from node.context import NodeContext
from node.db import utcnow
from node.jobs.records import HousekeepingView, JobView
from node.overview import format_bytes
from node.spool import STOW_FOLDER, STOW_LOCK_SUFFIX

log = logging.getLogger(__name__)

ACTOR = "housekeeping"
DERIVED_FOLDER = "derived"


@dataclass
class PurgeReport:
    jobs: list[int] = field(default_factory=list)
    received_files: int = 0
    derived_files: int = 0
    orphan_files: int = 0
    bytes: int = 0


def _remove(ctx: NodeContext, paths: list[str], dry_run: bool) -> tuple[int, int]:
    """Remove spool files; returns (files, bytes) removed (or that would be)."""
    files = freed = 0
    for relative in paths:
        path = ctx.spool.path(relative)
        try:
            size = path.stat().st_size
            if not dry_run:
                path.unlink()
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.warning("housekeeping could not remove %s: %s", relative, exc.strerror)
            continue
        files, freed = files + 1, freed + size
    return files, freed


def _derived_folder(ctx: NodeContext, job_id: int) -> Path:
    return ctx.spool.path(f"{DERIVED_FOLDER}/{int(job_id)}")


def _derived_files(ctx: NodeContext, job_id: int) -> list[str]:
    """The job's derived files: those recorded, and any others in its folder."""
    recorded = {d.spool_path for d in ctx.queries.derived_instances(job_id)}
    folder = _derived_folder(ctx, job_id)
    found = {
        path.relative_to(ctx.spool.root).as_posix()
        for path in (folder.rglob("*") if folder.is_dir() else [])
        if path.is_file()
    }
    return sorted(recorded | found)


def _purge_job(
    ctx: NodeContext,
    job: JobView,
    cutoff: datetime,
    why: str,
    actor: str,
    dry_run: bool,
    report: PurgeReport,
) -> None:
    """Remove one final job's files; its series' received files only when every job of
    the series is final and finished before ``cutoff`` (a late instance needs them)."""
    from node.web.preview import drop_previews

    with ctx.manager.held_received_files(job.series_instance_uid, cutoff) as received:
        received_files, received_bytes = _remove(ctx, received, dry_run)
    derived_files, derived_bytes = _remove(ctx, _derived_files(ctx, job.id), dry_run)
    report.jobs.append(job.id)
    report.derived_files += derived_files
    report.received_files += received_files
    report.bytes += derived_bytes + received_bytes
    if dry_run:
        return
    drop_previews(ctx.settings, job.id)
    with suppress(OSError):  # the receiver may still write into a date folder: keep those
        _derived_folder(ctx, job.id).rmdir()
    detail = (
        f"{derived_files} derived and {received_files} received files, "
        f"{format_bytes(derived_bytes + received_bytes)} ({why})"
    )
    ctx.manager.record_purge(job.id, actor, detail)
    log.info(
        "purged spool of job %s: %s",
        job.id,
        detail,
        extra={"audit": True, "actor": actor, "action": "purge", "job_id": job.id},
    )


def _purgeable(ctx: NodeContext, finished_before: datetime) -> list[JobView]:
    timeouts = {
        name: destination.commitment_timeout_seconds
        for name, destination in ctx.settings.committing().items()
    }
    return ctx.queries.purgeable_jobs(finished_before, timeouts)


def spool_used_percent(ctx: NodeContext) -> float:
    """How full the spool's disk is, as ``df`` says it (blocks reserved for root left out)."""
    usage = shutil.disk_usage(ctx.spool.root)
    available = usage.used + usage.free
    return 100.0 * usage.used / available if available else 0.0


def _relieve_spool(ctx: NodeContext, actor: str, report: PurgeReport) -> None:
    """Above the high-water mark: final jobs, however recent, oldest first, until below."""
    mark = ctx.settings.spool_high_water_percent
    now = utcnow()
    for job in _purgeable(ctx, now):
        used = spool_used_percent(ctx)
        if used <= mark:
            return
        _purge_job(ctx, job, now, f"spool {used:.0f}% full, above {mark:g}%", actor, False, report)


def _unrecorded_copies(ctx: NodeContext, dry_run: bool) -> tuple[int, int]:
    """Copies kept after a job-table error (``node.unrecorded``), marked longer than
    ``unrecorded_grace_seconds`` ago: removed unless a row names them; the marks go."""
    marked = unrecorded.marked_before(ctx.spool, ctx.settings.unrecorded_grace_seconds)
    if not marked:
        return 0, 0
    named = ctx.queries.spool_paths_in_use()
    removed = _remove(ctx, [relative for relative in marked if relative not in named], dry_run)
    if not dry_run:
        for relative in marked:
            unrecorded.unmark(ctx.spool, relative)
    return removed


def _orphans(ctx: NodeContext) -> list[str]:
    """Spool files no row names, older than the grace period, of no unfinished job (a
    web role's lock file stays: the next web role's start removes it once that role ended)."""
    older_than = time.time() - ctx.settings.orphan_grace_seconds
    named = ctx.queries.spool_paths_in_use()
    unfinished = {str(job_id) for job_id in ctx.queries.unfinished_job_ids()}
    orphans = []
    for path in ctx.spool.root.rglob("*"):
        relative = path.relative_to(ctx.spool.root).as_posix()
        parts = relative.split("/")
        of_unfinished = len(parts) > 2 and parts[0] == DERIVED_FOLDER and parts[1] in unfinished
        web_lock = parts[0] == STOW_FOLDER and relative.endswith(STOW_LOCK_SUFFIX)
        kept = of_unfinished or web_lock or parts[0] == unrecorded.UNRECORDED_FOLDER
        if relative in named or kept:
            continue
        with suppress(FileNotFoundError):
            if path.is_file() and not path.is_symlink() and path.stat().st_mtime < older_than:
                orphans.append(relative)
    return sorted(orphans)


def purge_spool(
    ctx: NodeContext,
    older_than_days: float,
    actor: str,
    dry_run: bool = False,
    relieve: bool = False,
) -> PurgeReport:
    """Remove the files of jobs final for longer than ``older_than_days`` and orphans;
    with ``relieve``, also what the high-water mark asks.  Kept as the last run."""
    cutoff = utcnow() - timedelta(days=older_than_days)
    report = PurgeReport()
    for job in _purgeable(ctx, cutoff):
        _purge_job(ctx, job, cutoff, f"retention {older_than_days:g} days", actor, dry_run, report)
    if relieve and not dry_run:
        _relieve_spool(ctx, actor, report)
    copies, copy_bytes = _unrecorded_copies(ctx, dry_run)
    report.orphan_files, orphan_bytes = _remove(ctx, _orphans(ctx), dry_run)
    report.orphan_files += copies
    report.bytes += orphan_bytes + copy_bytes
    if not dry_run:
        files = report.derived_files + report.received_files + report.orphan_files
        ctx.manager.record_housekeeping(
            HousekeepingView(
                utcnow(), actor, len(report.jobs), files, report.orphan_files, report.bytes
            )
        )
    if report.orphan_files:
        log.info("housekeeping removed %s orphaned spool files", report.orphan_files)
    return report


class Housekeeper:
    """The step ``node.service`` polls every ``housekeeping_seconds``."""

    def __init__(self, ctx: NodeContext) -> None:
        self.ctx = ctx

    def run_once(self) -> bool:
        """One pass; returns False so the loop waits a whole interval before the next."""
        purge_spool(self.ctx, self.ctx.settings.retention_days, ACTOR, relieve=True)
        return False
